"""Pearson's r and Spearman's ρ against numpy and hand-ranked references."""

import numpy as np
import pytest

from personaxis.traits.stats import pearson, ranks, spearman


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
