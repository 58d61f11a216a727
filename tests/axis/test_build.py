"""The build on a tiny random model with a scripted judge: filtering, the axis against a slow reference, resuming,
artifacts, and what happens when the judge answers garbage or fails."""

import json

import pytest
import torch
from axis.axis_helpers import FakeJudge, role_of

import personaxis.runs
from personaxis.axis.build import ROLLOUT_STAGE, BuildConfig, build_axis, judge_roles, plan_rollouts
from personaxis.axis.library import load_axis_traits, load_role_rubric, load_roles
from personaxis.errors import PersonaxisError
from personaxis.judge.scoring import Distribution
from personaxis.store import RunStore
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
    original = personaxis.runs.generate_batch

    def counting(model, prompts, *args, **kwargs):
        generated.extend(prompts)
        return original(model, prompts, *args, **kwargs)

    monkeypatch.setattr(personaxis.runs, "generate_batch", counting)
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

    class Tracing(personaxis.runs.LocalBackend):
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
