"""Pearson's r and Spearman's ρ against numpy and hand-ranked references; the sign-flip and rank tests against
enumeration."""

import itertools

import numpy as np
import pytest

from personaxis.common.stats import below, check_alpha, pearson, ranks, rise_p, spearman
from personaxis.errors import PersonaxisError


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 200):
        x, y = rng.normal(size=n), rng.normal(size=n)
        y = y + 0.5 * x
        assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_spearman_is_pearson_of_ranks_with_mean_ranks_for_ties():
    assert ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert spearman(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)  # monotone, not linear
    tied = [1, 2, 2, 3]
    assert spearman(tied, [4, 3, 3, 1]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [4, 2.5, 2.5, 1])[0, 1])


def test_undefined_cases_are_none():
    assert pearson([1.0], [2.0]) is None
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert spearman([], []) is None
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def _sign_flip_p(after, before):
    """Reference: every assignment of signs to the paired differences; the share whose mean is at least the observed."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    observed = sum(d) / len(d)
    flips = itertools.product((1, -1), repeat=len(d))
    means = [sum(s * x for s, x in zip(signs, d, strict=True)) / len(d) for signs in flips]
    return sum(m >= observed - 1e-12 for m in means) / len(means)


@pytest.mark.parametrize(
    "after, before",
    [
        ([2, 3, 4, 5, 6], [1, 1, 1, 1, 1]),  # every pair rose: 2^-5
        ([2, 3, 4, 5, 0], [1, 1, 1, 1, 1]),  # one fell
        ([2, 3, 4, 5, 1], [1, 1, 1, 1, 1]),  # one tied
        ([1, 1, 1], [2, 3, 4]),  # all fell
        ([5], [1]),
        ([1], [5]),
        ([61.5, 58.0, 70.2, 49.9, 55.0, 62.3], [55.0, 58.0, 51.1, 50.3, 54.2, 48.0]),
    ],
)
def test_rise_p_matches_enumeration(after, before):
    assert rise_p(after, before) == pytest.approx(_sign_flip_p(after, before))


def test_rise_p_random_beyond_the_exact_limit_and_edge_cases():
    rng = np.random.default_rng(3)
    before = rng.normal(size=14)
    after = before + rng.normal(0.4, 1.0, size=14)
    exact = _sign_flip_p(after, before)
    assert rise_p(after, before) == pytest.approx(exact)
    assert rise_p(after, before, exact_up_to=10) == pytest.approx(exact, abs=0.05)  # 1,024 random flips
    assert rise_p([], []) == 1.0 and rise_p([3, 3], [3, 3]) == 1.0
    with pytest.raises(ValueError):
        rise_p([1, 2], [1])


def test_alpha_bounds():
    check_alpha(1.0)
    check_alpha(1e-6)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(PersonaxisError, match="--alpha must be above 0 and at most 1"):
            check_alpha(bad)


def _pairs_below(x, y):
    """Reference: the share of (x, y) pairs with x below y, ties counting half."""
    return sum((a < b) + 0.5 * (a == b) for a in x for b in y) / (len(x) * len(y))


def _rank_p(x, y):
    """Reference: over every way to split the pooled values into groups of len(x) and len(y), the share whose x-group
    lies below its y-group at least as often as the observed one."""
    pooled = [*x, *y]
    observed = _pairs_below(x, y)
    splits = list(itertools.combinations(range(len(pooled)), len(x)))
    at_least = 0
    for chosen in splits:
        xs = [pooled[i] for i in chosen]
        ys = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        at_least += _pairs_below(xs, ys) >= observed - 1e-12
    return at_least / len(splits)


@pytest.mark.parametrize(
    "x, y",
    [
        ([0.1, 0.4, 0.2], [0.9, 0.5, 0.3, 0.8]),  # mostly below
        ([0.9, 0.5, 0.7], [0.1, 0.4, 0.2, 0.8]),  # mostly above
        ([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5, 0.5]),
    ],
)
def test_below_matches_pair_counting_and_enumeration(x, y):
    auroc, p = below(x, y)
    assert auroc == pytest.approx(_pairs_below(x, y))
    assert p == pytest.approx(_rank_p(x, y))


def test_below_counts_ties_half_and_is_undefined_on_an_empty_side():
    auroc, _ = below([1.0, 2.0], [2.0, 3.0])
    assert auroc == pytest.approx(_pairs_below([1.0, 2.0], [2.0, 3.0])) == pytest.approx(0.875)
    assert below([], [1.0]) is None and below([1.0], []) is None
