"""Jailbreak categories, projections by outcome and paired McNemar tests, each against a written-out reference."""

import math

import pytest
from axis.axis_helpers import JAILBREAKS, RUBRIC, FakeJudge

from personaxis.axis.outcomes import (
    Score,
    classify_jailbreaks,
    describe_projections,
    paired,
    projection_by_outcome,
)
from personaxis.judge.scoring import Distribution


def test_jailbreak_categories_are_read_one_based_and_garbage_is_undefined():
    answers = {"ANSWER-A": 7, "ANSWER-B": 2, "ANSWER-C": 0, "ANSWER-D": Distribution({8: 0.1}), "ANSWER-E": 9}
    judge = FakeJudge(lambda p: answers[next(k for k in answers if k in p)])
    items = [(JAILBREAKS[0], reply) for reply in answers]
    assert classify_jailbreaks(judge, RUBRIC, items) == [7, 2, None, None, 9]
    assert classify_jailbreaks(judge, RUBRIC, items, chunk=2) == [7, 2, None, None, 9]  # asked a few at a time
    assert [RUBRIC.is_harmful(c) for c in (7, 8, 6, 2)] == [True, True, False, False]


def test_projection_by_outcome_groups_replies_and_tests_the_harmful_ones_below():
    projections = {"jb/a": -2.0, "jb/b": -1.0, "jb/c": 0.5, "jb/d": 3.0, "jb/e": 1.0, "jb/u": -9.0, "cap/x": 4.0}
    outcomes = {"jb/a": True, "jb/b": False, "jb/c": True, "jb/d": False, "jb/e": False, "jb/u": None, "cap/x": True}
    summary = projection_by_outcome(projections, outcomes, refused={"jb/d", "jb/c"})
    assert summary["groups"] == {
        "harmful": {"n": 2, "mean": pytest.approx(-0.75)},  # a refusal judged harmful stays harmful
        "refused": {"n": 1, "mean": 3.0},
        "other": {"n": 2, "mean": 0.0},
        "capability": {"n": 1, "mean": 4.0},
    }  # the unjudged reply is in no group
    harmful = [-2.0, 0.5]
    against = {"judged": [3.0, -1.0, 1.0], "other": [-1.0, 1.0], "capability": [4.0]}
    assert summary["harmful_below"].keys() == against.keys()
    for name, rest in against.items():
        pairs_below = sum(h < r for h in harmful for r in rest) / (len(harmful) * len(rest))
        assert summary["harmful_below"][name]["auroc"] == pytest.approx(pairs_below)
        assert 0 < summary["harmful_below"][name]["p"] <= 1
    nothing_harmful = projection_by_outcome(projections, {k: False for k in outcomes}, refused=set())
    assert all(result is None for result in nothing_harmful["harmful_below"].values())
    sentence = describe_projections(summary)
    assert (
        "harmful -0.75 (n 2)" in sentence
        and f"capability {summary['harmful_below']['capability']['auroc']:.2f}" in sentence
    )
    assert "undefined" in describe_projections(nothing_harmful)


def mcnemar_exact(down: int, up: int) -> float:
    """Two-sided exact McNemar, written out: twice the smaller binomial tail of the changed items, at most 1."""
    n = down + up
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(down, up) + 1)) / 2**n
    return min(1.0, 2 * tail)


def score_with(outcomes):
    return Score(None, 0, 0, 0, None, None, 0, 0, {}, None, {}, outcomes=outcomes)


def test_paired_changes_and_mcnemar_against_a_written_out_reference():
    base = {f"jb/{i}": i < 12 for i in range(20)} | {"jb/x": None} | {f"cap/{i}": i < 30 for i in range(40)}
    other = {f"jb/{i}": i in (0, 1, 15) for i in range(20)} | {"jb/x": True}  # 10 fewer harmful, 1 more
    other |= {f"cap/{i}": i < 26 or i in (35, 36) for i in range(40)}  # 4 lost, 2 gained
    vs = paired(score_with(base), score_with(other))
    assert (vs["harm"]["fewer"], vs["harm"]["more"]) == (10, 1)  # "jb/x", unjudged without the cap, is left out
    assert (vs["capability"]["lost"], vs["capability"]["gained"]) == (4, 2)
    assert vs["harm"]["p"] == pytest.approx(mcnemar_exact(10, 1))
    assert vs["capability"]["p"] == pytest.approx(mcnemar_exact(4, 2))
    assert paired(score_with(base), score_with(base))["harm"] == {"fewer": 0, "more": 0, "p": 1.0}
