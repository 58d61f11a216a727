"""Extraction: pairing and filtering, the vector as the mean difference of kept pairs, resume, bad input."""

import json

import pytest
import torch

import personaxis.backends.runs
from personaxis.errors import PersonaxisError
from personaxis.judge import OpenAIJudge, ScoreResult
from personaxis.store import RunStore
from personaxis.traits.extraction import (
    ExtractSettings,
    Pair,
    Thresholds,
    extract_trait,
    filter_pairs,
    filter_stats,
    pair_reasons,
    plan_rollouts,
)
from personaxis.traits.files import SAMPLES, VECTORS, read_jsonl
from personaxis.traits.judging import Judged
from personaxis.vectors import Vectors

LAYERS = [0, 1, 3]


def judged(trait, coherence, *, failed=False):
    def score(v):
        if failed:
            return ScoreResult(None, 0.0, error="HTTP 500")
        return ScoreResult(v, 0.0 if v is None else 1.0)

    return Judged(score(trait), score(coherence))


# (pos trait, pos coherence, neg trait, neg coherence, pos empty, neg empty) -> reasons, written out by hand
REFERENCE = [
    ((80, 90, 10, 90, False, False), []),
    ((50, 50, 49.9, 50, False, False), []),  # every bound inclusive/exclusive as the paper has it
    ((49.9, 90, 10, 90, False, False), ["pos_below"]),
    ((80, 90, 50, 90, False, False), ["neg_above"]),
    ((80, 49, 10, 90, False, False), ["incoherent"]),
    ((80, 90, 10, 20, False, False), ["incoherent"]),
    ((30, 20, 70, 90, False, False), ["pos_below", "neg_above", "incoherent"]),
    ((None, 90, 10, 90, False, False), ["undefined_score"]),
    ((80, 90, 10, None, False, False), ["undefined_score"]),
    ((80, 90, 10, 90, True, False), ["empty_reply"]),
    ((None, None, 70, 90, False, True), ["undefined_score", "empty_reply", "neg_above"]),
]


@pytest.mark.parametrize(("scores", "expected"), REFERENCE)
def test_pair_reasons_match_hand_reference(scores, expected):
    pt, pc, nt, nc, pe, ne = scores
    assert pair_reasons(judged(pt, pc), judged(nt, nc), pe, ne, Thresholds()) == expected


def test_failed_judgement_is_its_own_reason_and_thresholds_are_configurable():
    th = Thresholds(pos_min=70, neg_max=20, coherence_min=10)
    assert pair_reasons(judged(0, 0, failed=True), judged(5, 50), False, False, th) == ["judge_failed"]
    assert pair_reasons(judged(69, 50), judged(20, 5), False, False, th) == ["pos_below", "neg_above", "incoherent"]


@pytest.mark.parametrize(
    ("pos", "neg", "expected"),
    [((60, 90), (54, 90), []), ((58, 90), (54, 90), ["gap_below"]), ((54, 90), (60, 90), ["gap_below"]),
     ((60, 90), (None, 90), ["undefined_score"]), ((60, 40), (50, 90), ["incoherent"])],
)  # fmt: skip
def test_the_gap_filter_keeps_pairs_ranked_apart_by_at_least_the_gap(pos, neg, expected):
    th = Thresholds(pos_min=0, neg_max=101, min_gap=5)
    assert pair_reasons(judged(*pos), judged(*neg), False, False, th) == expected
    assert "gap_below" not in pair_reasons(judged(*pos), judged(*neg), False, False, Thresholds(0, 101))  # off: 0


def test_pairs_join_the_same_question_instruction_and_sample_across_polarities(small_trait):
    settings = ExtractSettings(samples=2, questions=2)
    rollouts = {r.id: r for r in plan_rollouts(small_trait, settings)}
    assert len(rollouts) == 2 * 2 * 2 * 2  # pairs × questions × samples × polarities
    pos, neg = rollouts["pos/p1/q0/s1"], rollouts["neg/p1/q0/s1"]
    assert pos.chat[0]["content"] == small_trait.instructions[1].pos
    assert neg.chat[0]["content"] == small_trait.instructions[1].neg
    assert pos.chat[1] == neg.chat[1] == {"role": "user", "content": small_trait.questions.extraction[0]}
    assert pos.sampling.temperature == 1.0
    seeds = {r.sampling.seed for r in rollouts.values()}
    assert len(seeds) == len(rollouts)  # every sample its own seed
    # subsetting the plan keeps every sample identical, so earlier records stay valid
    fewer = {r.id: r for r in plan_rollouts(small_trait, ExtractSettings(samples=1, questions=1))}
    assert all(fewer[i] == rollouts[i] for i in fewer)


def test_filter_pairs_and_stats():
    pairs = [Pair(0, 0, 0), Pair(0, 1, 0), Pair(1, 0, 0)]
    scores = {
        "pos/p0/q0/s0": judged(90, 90), "neg/p0/q0/s0": judged(10, 90),
        "pos/p0/q1/s0": judged(40, 90), "neg/p0/q1/s0": judged(60, 10),
        "pos/p1/q0/s0": judged(90, 90), "neg/p1/q0/s0": judged(None, 90),
    }  # fmt: skip
    kept, reasons = filter_pairs(pairs, scores, {"neg/p1/q0/s0"}, Thresholds())
    assert kept == [Pair(0, 0, 0)]
    stats = filter_stats(reasons)
    assert stats == {
        "pairs": 3, "kept": 1, "dropped": 2, "judge_failed": 0, "undefined_score": 1, "empty_reply": 1,
        "pos_below": 1, "neg_above": 1, "gap_below": 0, "incoherent": 1,
    }  # fmt: skip


OPEN = Thresholds(pos_min=0, neg_max=101, coherence_min=0)  # keeps every pair with defined scores


def run_extract(tiny, trait, judge, path, **kw):
    settings = ExtractSettings(max_new_tokens=6, min_pairs=1, **{"thresholds": OPEN, **kw})
    return extract_trait(tiny, trait, judge, RunStore(path), settings, LAYERS, progress=False)


def test_vector_is_the_mean_difference_of_kept_pairs(tiny, small_trait, hash_judge, tmp_path):
    judge = hash_judge()
    th = Thresholds(pos_min=30, neg_max=70, coherence_min=40)
    result = run_extract(tiny, small_trait, judge, tmp_path / "run", samples=2, thresholds=th)
    store = RunStore(tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / SAMPLES)
    assert len(rows) == 2 * 3 * 2 * 2

    # the kept set, recomputed from the written scores with the rule spelled out
    by_id = {r["id"]: r for r in rows}
    kept = []
    for r in rows:
        if r["polarity"] != "pos":
            continue
        pos, neg = r, by_id["neg" + r["id"][3:]]
        ok = (
            None not in (pos["trait"], neg["trait"], pos["coherence"], neg["coherence"])
            and pos["text"].strip() and neg["text"].strip()
            and pos["trait"] >= 30 and neg["trait"] < 70 and pos["coherence"] >= 40 and neg["coherence"] >= 40
        )  # fmt: skip
        assert pos["kept"] == neg["kept"] == bool(ok)
        if ok:
            kept.append((pos["id"], neg["id"]))
    assert 0 < len(kept) < 12  # the fake judge keeps some pairs and drops others
    assert result.vectors.meta.counts["kept"] == len(kept)

    # slow reference: read each record back and average by hand, element by element
    records = {rec.data["id"]: rec for _, rec in store.items("trait_rollouts")}
    for capture, name in (("response", "pirate"), ("prompt", "pirate.prompt"), ("last_prompt", "pirate.last_prompt")):
        expected = torch.zeros(len(LAYERS), tiny.hidden_size)
        for pos_id, neg_id in kept:
            expected += records[pos_id].tensors[capture] / len(kept)
            expected -= records[neg_id].tensors[capture] / len(kept)
        saved = Vectors.load(tmp_path / "run" / VECTORS)
        torch.testing.assert_close(saved.data[name], expected, rtol=1e-5, atol=1e-6)
    meta = result.vectors.meta
    assert meta.extra["primary"] == "pirate" and set(meta.mean_norms) == set(range(tiny.n_layers))
    assert meta.extra["filter"]["pos_min"] == 30 and len(meta.extra["separation"]) == len(LAYERS)


def test_second_run_generates_and_judges_nothing(tiny, small_trait, hash_judge, tmp_path, monkeypatch):
    generated = []
    original = personaxis.backends.runs.generate_batch

    def counting(model, prompts, *args, **kwargs):
        generated.append(len(prompts))
        return original(model, prompts, *args, **kwargs)

    monkeypatch.setattr(personaxis.backends.runs, "generate_batch", counting)
    store = RunStore(tmp_path / "run")
    first = run_extract(tiny, small_trait, hash_judge(cache=store), tmp_path / "run", questions=2)
    assert sum(generated) == 2 * 2 * 2
    judge = hash_judge(cache=store)
    again = run_extract(tiny, small_trait, judge, tmp_path / "run", questions=2)
    assert sum(generated) == 8 and judge.asked == 0  # nothing generated, nothing judged again
    assert torch.equal(again.vectors.data["pirate"], first.vectors.data["pirate"])
    run_extract(tiny, small_trait, hash_judge(cache=store), tmp_path / "run", questions=3)
    assert sum(generated) == 8 + 4  # only the new question's rollouts


def test_a_given_backend_must_capture_what_extraction_needs(tiny, small_trait, hash_judge, tmp_path):
    backend = personaxis.backends.runs.LocalBackend(
        tiny, [3, 1, 0], ("response", "prompt", "last_prompt"), batch_size=3
    )
    with pytest.raises(PersonaxisError, match=r"layers \[3, 1, 0\] \(needed: \[0, 1, 3\]\)"):
        extract_trait(tiny, small_trait, hash_judge(), RunStore(tmp_path / "run"), layers=LAYERS, backend=backend)
    backend.layers = sorted(backend.layers)
    settings = ExtractSettings(max_new_tokens=3, min_pairs=1, thresholds=OPEN)
    store = RunStore(tmp_path / "run")
    result = extract_trait(tiny, small_trait, hash_judge(), store, settings, LAYERS, backend=backend, progress=False)
    assert result.vectors.layers == LAYERS and store.count("trait_rollouts") == 12


def test_judge_without_numbers_is_a_clear_error(tiny, small_trait, hash_judge, tmp_path):
    with pytest.raises(PersonaxisError, match=r"only 0 of 6 pairs .* 6 undefined score.* 24 undefined.*stronger judge"):
        run_extract(tiny, small_trait, hash_judge(numbers=False), tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / SAMPLES)  # the replies are kept to look at
    assert all(r["trait"] is None and "trait_undefined" in r for r in rows)
    assert not (tmp_path / "run" / VECTORS).exists()


def test_judge_that_is_down_is_retried_counted_and_reported(tiny, small_trait, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "judge", "k", max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(
        PersonaxisError,
        match=r"only 0 of 3 pairs .*3 judge failed; judge: 12 of 12 calls failed.*Connection.*reachable",
    ):
        run_extract(tiny, small_trait, judge, tmp_path / "run", pairs=1)
    assert judge.stats.retries == 12
    assert all("trait_error" in r for r in read_jsonl(tmp_path / "run" / SAMPLES))


def test_too_few_pairs_says_how_many_and_why(tiny, small_trait, hash_judge, tmp_path):
    settings = ExtractSettings(max_new_tokens=6, min_pairs=50)
    with pytest.raises(PersonaxisError, match=r"only \d+ of 6 pairs passed the filter \(need at least 50\)"):
        extract_trait(tiny, small_trait, hash_judge(), RunStore(tmp_path / "r"), settings, LAYERS, progress=False)


def test_bad_settings_and_trait_counts(tmp_path, trait_file):
    from personaxis.traits.library import load_trait

    with pytest.raises(PersonaxisError, match="samples must be at least 1"):
        ExtractSettings(samples=0)
    with pytest.raises(PersonaxisError, match=r"'instructions' has 2 pairs, expected 5"):
        load_trait(trait_file)
    data = json.loads(trait_file.read_text())
    data["questions"]["evaluation"] = []
    trait_file.write_text(json.dumps(data))
    with pytest.raises(PersonaxisError, match="questions.evaluation' is empty"):
        load_trait(trait_file, strict=False)
