"""The build on a tiny random model with a scripted judge: filtering, the axis against a slow reference, resuming,
artifacts, and what happens when the judge answers garbage or fails."""

import json
from dataclasses import replace

import pytest
import torch
from axis.axis_helpers import FakeJudge, role_of

import personaxis.backends.runs
from personaxis.axis.analysis import analyse
from personaxis.axis.build import BuildConfig, build_axis, judge_roles
from personaxis.axis.library import RoleRubric, load_axis_traits, load_role_rubric, load_roles
from personaxis.axis.rollouts import ROLLOUT_STAGE, plan_rollouts
from personaxis.errors import PersonaxisError
from personaxis.judge.scoring import Distribution
from personaxis.store import Record, RunStore
from personaxis.vectors import Vectors

ROLES = [r for r in load_roles() if r.name in ("pirate", "cat", "demon", "therapist")]
QUESTIONS = ["Who are you?", "What do you do all day?"]
TRAITS = load_axis_traits()[:1]
CONFIG = BuildConfig(questions=2, max_tokens=3, judge="fake", min_count=3, batch_size=16)
SCRIPT = {"pirate": 3, "therapist": 3, "cat": 2, "demon": Distribution({}, raw="Arr")}  # demon: no digit at all


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scripted(run=None):
    judge = FakeJudge(lambda p: SCRIPT[role_of(p)])
    judge.cache = RunStore(run) if run is not None else None  # judge answers cached in the run, as the CLI does
    return judge


def build(tiny, run, config=CONFIG, judge=None, **kwargs):
    judge = judge if judge is not None else scripted(run)
    return build_axis(
        tiny, run, config, judge=judge, roles=ROLES, questions=QUESTIONS, traits=TRAITS, progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    run = tmp_path_factory.mktemp("axis-run")
    return run, build(tiny, run)


def test_plan_covers_roles_default_and_traits_with_per_sample_seeds():
    plan = plan_rollouts(BuildConfig(questions=2, samples=2), ROLES[:1], [None, "You are X."], QUESTIONS, TRAITS)
    kinds = [r.labels["kind"] for r in plan]
    assert kinds.count("role") == 5 * 2 * 2 and kinds.count("default") == 2 * 2 * 2
    assert kinds.count("trait") == (len(TRAITS[0].pos) + len(TRAITS[0].neg)) * 2 * 2
    assert len({r.sampling.seed for r in plan}) == len(plan)
    assert plan[0].sampling.temperature == 0.7 and plan[0].sampling.top_p == 0.9
    default = [r for r in plan if r.labels["kind"] == "default"]
    assert default[0].chat == [{"role": "user", "content": "Who are you?"}]  # the null prompt: no system message


def test_roles_are_filtered_by_score_and_count(built):
    _, result = built
    roles = result.summary["roles"]
    assert roles["kept"] == ["pirate", "therapist"]
    assert roles["dropped"] == {"cat": 0, "demon": 0}
    assert result.summary["scores"]["cat"] == {"2": 10}
    assert result.summary["scores"]["demon"] == {"undefined": 10}  # garbage is counted, never scored
    assert result.summary["judge"]["undefined"] == 10 and result.summary["judge"]["failed"] == 0
    assert sorted(result.roles.names) == ["default", "pirate", "therapist"]


def test_axis_matches_a_slow_reference_over_the_stored_records(built, tiny):
    run, result = built
    by_kind = {"default": [], "pirate": [], "therapist": []}
    for _, record in RunStore(run).items(ROLLOUT_STAGE):
        labels = record.data["labels"]
        if labels["kind"] == "default":
            by_kind["default"].append(record.tensors["response"])
        elif labels["kind"] == "role" and labels["role"] in ("pirate", "therapist"):
            by_kind[labels["role"]].append(record.tensors["response"])
    assert len(by_kind["default"]) == 10 and len(by_kind["pirate"]) == 10
    mean = {k: sum(v) / len(v) for k, v in by_kind.items()}
    want = mean["default"] - (mean["pirate"] + mean["therapist"]) / 2
    torch.testing.assert_close(result.axis.data["axis"], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.roles.data["default"], mean["default"], rtol=1e-4, atol=1e-5)
    assert result.axis.layers == list(range(tiny.n_layers))


def test_artifacts_summary_and_plots(built, tiny):
    run, result = built
    summary = json.loads((run / "summary.json").read_text())
    assert summary["target_layer"] == tiny.n_layers // 2
    assert summary["pca"]["cumulative"][-1] == pytest.approx(1.0)  # two roles: one component holds everything
    assert len(summary["axis"]["pc1_cosine_by_layer"]) == tiny.n_layers
    axis = Vectors.load(run / "artifacts" / "axis.safetensors")
    assert axis.meta.extra["target_layer"] == tiny.n_layers // 2 and axis.meta.extra["judged"] is True
    assert axis.meta.mean_norms and "Assistant" in axis.meta.points_toward
    traits = Vectors.load(run / "artifacts" / "traits.safetensors")
    assert traits.names == [TRAITS[0].name]
    assert set(summary["traits"][TRAITS[0].name]) == {"cosine_with_axis", "cosine_with_pcs"}
    pcs = Vectors.load(run / "artifacts" / "pca.safetensors")
    assert pcs.layers == [tiny.n_layers // 2] and pcs.names == ["pc1"]
    for name in ("pca_scatter.png", "variance.png", "cosine_by_layer.png"):
        assert (run / "plots" / name).read_bytes().startswith(b"\x89PNG")


def test_rerun_generates_and_judges_nothing_new(built, tiny, monkeypatch):
    run, first = built
    generated = []
    original = personaxis.backends.runs.generate_batch

    def counting(model, prompts, *args, **kwargs):
        generated.extend(prompts)
        return original(model, prompts, *args, **kwargs)

    monkeypatch.setattr(personaxis.backends.runs, "generate_batch", counting)
    judge = scripted(run)
    second = build(tiny, run, judge=judge)
    assert generated == [] and judge.calls == 0
    torch.testing.assert_close(second.axis.data["axis"], first.axis.data["axis"])


def test_unjudged_build_keeps_every_reply_and_says_so(tiny, tmp_path):
    config = BuildConfig(questions=2, max_tokens=3, judge="none", min_count=1, traits=0, batch_size=16)
    result = build_axis(tiny, tmp_path, config, roles=ROLES[:2], questions=QUESTIONS, progress=False)
    assert result.summary["roles"]["fully_in_role_counts"] == {ROLES[0].name: 10, ROLES[1].name: 10}
    assert "unjudged" in result.summary["judge"]["mode"]
    assert "unjudged" in result.axis.meta.method and result.axis.meta.extra["judged"] is False
    assert result.traits is None


def test_a_min_count_no_role_can_reach_is_refused_before_any_rollout(tiny, tmp_path):
    config = BuildConfig(questions=2, max_tokens=3, judge="none", min_count=11, traits=0)
    with pytest.raises(PersonaxisError, match=r"--min-count 11 cannot be met: a role gets 10 replies \(5 prompts"):
        build_axis(tiny, tmp_path, config, roles=ROLES[:2], questions=QUESTIONS, progress=False)
    assert not (tmp_path / "records.sqlite").exists()


def test_a_given_backend_runs_the_rollouts_and_must_fit_the_build(tiny, tmp_path):
    config = BuildConfig(questions=1, max_tokens=2, judge="none", min_count=1, traits=0)
    used = []

    class Tracing(personaxis.backends.runs.LocalBackend):
        def stream(self, rollouts):
            used.extend(rollouts)
            yield from super().stream(rollouts)

    result = build_axis(tiny, tmp_path / "ok", config, roles=ROLES[:2], questions=QUESTIONS, progress=False,
                        backend=Tracing(tiny, range(tiny.n_layers), ("response",), batch_size=4))  # fmt: skip
    assert len(used) == result.summary["counts"]["rollouts"] > 0
    for wrong, message in [
        (Tracing(tiny, [0, 1], ("response",)), r"layers \[0, 1\] \(needed: \[0, 1, 2, 3\]\)"),
        (Tracing(tiny, range(tiny.n_layers), ("prompt",)), r"captures \['prompt'\] \(needed: \['response'\]\)"),
    ]:
        with pytest.raises(PersonaxisError, match=message):
            build_axis(tiny, tmp_path / "bad", config, roles=ROLES[:2], questions=QUESTIONS, backend=wrong)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_too_few_roles_after_filtering_is_a_clear_error(tiny, tmp_path):
    judge = FakeJudge(lambda p: 1)
    with pytest.raises(PersonaxisError, match="only 0 role.*--judge none"):
        build(tiny, tmp_path, judge=judge)


def test_a_build_of_another_model_is_refused(built, tiny):
    run, _ = built
    other = type(tiny)(model=tiny.model, tokenizer=tiny.tokenizer, name="another-model")
    with pytest.raises(PersonaxisError, match="holds a build of tiny-llama"):
        build(other, run)


def test_failed_judge_calls_are_retried_then_counted():
    rubric = load_role_rubric()
    flaky: dict[str, int] = {}

    def answer(prompt):
        flaky[prompt] = flaky.get(prompt, 0) + 1
        if "always down" in prompt:
            return None
        return None if flaky[prompt] == 1 else 3  # fails once, then answers

    judge = FakeJudge(answer)
    items = [("a", ROLES[0], "q", "fine"), ("b", ROLES[0], "q", "always down")]
    result = judge_roles(judge, rubric, items, retries=2)
    assert result.scores == {"a": 3, "b": None}
    assert result.failed == 1 and result.undefined == 0
    down = [n for prompt, n in flaky.items() if "always down" in prompt]
    assert down == [3]  # the first try plus two retries


def test_judge_sees_the_rubric_and_digit_labels():
    seen = []
    judge = FakeJudge(lambda p: seen.append(p) or 2)
    result = judge_roles(judge, load_role_rubric(), [("a", ROLES[0], "Who are you?", "Arr, a pirate I be")])
    assert result.scores == {"a": 2}
    assert "Arr, a pirate I be" in seen[0] and "Who are you?" in seen[0]
    assert "0: 0" in seen[0] and "3: 3" in seen[0]  # options are the labels "0".."3"


# --- screening replies that present themselves as an AI ---------------------------------------------------------


def _rubric(*patterns):
    return RoleRubric.model_validate({**load_role_rubric().model_dump(), "ai_self_reference": list(patterns)})


def test_analysis_screens_ai_replies_and_relates_their_share_to_pc1():
    """Role vectors keep only the screened-in replies; shares and Spearman's ρ against a by-hand reference."""
    gen = torch.Generator().manual_seed(0)
    records, labels, as_ai = {}, {}, set()
    n_ai = {"r0": 0, "r1": 1, "r2": 2, "r3": 3, "r4": 1}  # of 4 replies each
    for role, k in n_ai.items():
        for i in range(4):
            rid = f"{role}-{i}"
            records[rid] = Record({"text": "x"}, {"response": torch.randn(3, 5, generator=gen)}, 0.0)
            labels[rid] = {"kind": "role", "role": role}
            if i < k:
                as_ai.add(rid)
    records["d"] = Record({"text": "x"}, {"response": torch.randn(3, 5, generator=gen)}, 0.0)
    labels["d"] = {"kind": "default"}
    found = analyse({}, records, labels, None, min_count=1, target_layer=1, as_ai=as_ai, screen=True)
    vectors, summary = found.vectors, found.summary

    for role, k in n_ai.items():
        kept = [records[f"{role}-{i}"].tensors["response"] for i in range(k, 4)]
        torch.testing.assert_close(vectors[role], sum(kept) / len(kept))
    assert summary["scores"]["r3"] == {"screened": 3, "kept": 1}
    found = summary["ai_self_reference"]
    assert (found["replies"], found["of"]) == (7, 20)
    assert found["share_by_role"] == {role: k / 4 for role, k in n_ai.items()}

    pc1 = [summary["pca"]["role_coordinates"][r][0] for r in n_ai]
    share = [found["share_by_role"][r] for r in n_ai]

    def ranks(xs):  # average ranks, ties shared
        return [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]

    a, b = ranks(share), ranks(pc1)
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    want = cov / (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    assert found["pc1_spearman"] == pytest.approx(want)
    assert 0 <= found["pc1_spearman_p"] <= 1

    found = analyse({}, records, labels, None, min_count=1, target_layer=1, as_ai=as_ai)
    unscreened, plain = found.vectors, found.summary
    all_r3 = [records[f"r3-{i}"].tensors["response"] for i in range(4)]
    torch.testing.assert_close(unscreened["r3"], sum(all_r3) / 4)  # unjudged: counted, not dropped
    assert plain["scores"]["r3"] == {"unjudged": 4} and plain["ai_self_reference"]["replies"] == 7


def test_a_screened_build_reuses_the_rollouts_and_drops_what_the_patterns_match(tiny, tmp_path):
    unjudged = BuildConfig(questions=2, max_tokens=3, judge="none", min_count=1, traits=0, batch_size=16)
    first = build_axis(tiny, tmp_path, unjudged, roles=ROLES[:3], questions=QUESTIONS, progress=False)
    screen = replace(unjudged, screen=True)
    never = build_axis(tiny, tmp_path, screen, roles=ROLES[:3], questions=QUESTIONS, rubric=_rubric("(?!)"),
                       progress=False)  # fmt: skip
    torch.testing.assert_close(never.axis.data["axis"], first.axis.data["axis"])
    assert never.summary["judge"]["mode"].startswith("screened") and never.axis.meta.extra["judged"] is False
    assert never.summary["scores"][ROLES[0].name] == {"kept": 10}
    with pytest.raises(PersonaxisError, match="only 0 role.*do not present themselves as an AI"):
        build_axis(tiny, tmp_path, screen, roles=ROLES[:3], questions=QUESTIONS, rubric=_rubric("."), progress=False)
    with pytest.raises(PersonaxisError, match="--screen needs the rubric's ai_self_reference patterns"):
        build_axis(tiny, tmp_path / "none", screen, roles=ROLES[:3], questions=QUESTIONS, rubric=_rubric())
    assert not (tmp_path / "none").exists()


def test_a_judge_sees_only_the_replies_the_screen_lets_through(tiny, tmp_path):
    """Screened replies are never judged and never kept, whatever a judge would have said of them."""
    seen = []
    judge = FakeJudge(lambda p: seen.append(p) or 3)
    rubric = _rubric("^\\S*[aeiou]")  # some replies of a random model match, some do not
    config = replace(CONFIG, screen=True, min_count=1)
    result = build(tiny, tmp_path, config=config, judge=judge, rubric=rubric)
    texts = {
        r.data["text"]
        for _, r in RunStore(tmp_path).items(ROLLOUT_STAGE, tensors=False)
        if r.data["labels"]["kind"] == "role"
    }
    screened = {t for t in texts if rubric.presents_as_ai(t)}
    assert screened and screened != texts
    assert not any(f"<reply>\n{t}\n</reply>" in p for t in screened for p in seen)
    counts = {k: sum(row.get(k, 0) for row in result.summary["scores"].values()) for k in ("screened", "3")}
    assert counts["screened"] + counts["3"] == result.summary["counts"]["role_replies"] - sum(
        row.get("empty", 0) for row in result.summary["scores"].values()
    )
    assert counts["3"] == len(seen) and "judged" in result.summary["judge"]["mode"]
