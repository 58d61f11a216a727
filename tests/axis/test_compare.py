"""Agreement of role orderings between builds, against plain numpy formulas."""

import math

import numpy as np
import pytest
from scipy import stats

from personaxis.axis.compare import agreement
from personaxis.errors import PersonaxisError


def _ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(values))
    ranks[np.argsort(values)] = np.arange(len(values))
    return ranks


def test_agreement_matches_the_textbook_formulas():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=12)
    ys = 0.6 * xs + rng.normal(size=12)
    a = {f"role{i}": float(x) for i, x in enumerate(xs)}
    b = {f"role{i}": float(y) for i, y in enumerate(ys)} | {"only-in-b": 5.0}
    got = agreement(a, {**b})
    assert got["roles"] == 12
    r = np.corrcoef(xs, ys)[0, 1]
    assert math.isclose(got["pearson_r"], r, rel_tol=1e-9)
    t = r * math.sqrt(10 / (1 - r**2))
    assert math.isclose(got["pearson_p"], 2 * stats.t.sf(abs(t), 10), rel_tol=1e-6)
    assert math.isclose(got["spearman_rho"], np.corrcoef(_ranks(xs), _ranks(ys))[0, 1], rel_tol=1e-9)


def test_agreement_needs_three_shared_roles_that_vary():
    with pytest.raises(PersonaxisError, match="share 2 role"):
        agreement({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 2.0, "d": 3.0})
    with pytest.raises(PersonaxisError, match="the same value"):
        agreement({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1.0, "b": 2.0, "c": 3.0})
