"""The statistics the pipelines report and choose by.

The correlations return None when undefined (fewer than two points, or a constant variable) instead of NaN, so reports
can say "undefined" rather than print a number that is not one. The significance tests guard choices: a sweep that
picks the best of many cells picks noise unless it asks whether the cell's gain holds item by item.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from personaxis.errors import PersonaxisError


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r between two equally long sequences (scipy's `pearsonr`)."""
    from scipy.stats import pearsonr

    a, b = _pair(x, y, "pearson")
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.clip(pearsonr(a, b).statistic, -1.0, 1.0))


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (the convention Spearman's ρ needs)."""
    from scipy.stats import rankdata

    return rankdata(np.asarray(x, dtype=np.float64), method="average")


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ: Pearson's r of the ranks (scipy's `spearmanr`)."""
    from scipy.stats import spearmanr

    a, b = _pair(x, y, "spearman")
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.clip(spearmanr(a, b).statistic, -1.0, 1.0))


def _pair(x: Sequence[float], y: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"{name} needs two 1-D sequences of the same length")
    return a, b


def check_alpha(alpha: float) -> None:
    """A significance level for a choice's test: above 0, at most 1 (1 waives the test)."""
    if not 0 < alpha <= 1:
        raise PersonaxisError(f"--alpha must be above 0 and at most 1, got {alpha:g}")


def rise_p(after: Sequence[float], before: Sequence[float], exact_up_to: int = 16) -> float:
    """One-sided p-value that `after` exceeds `before` pair by pair: a sign-flip permutation test of the mean paired
    difference, exact up to `exact_up_to` pairs (2^n flips), seeded random flips beyond. No pairs, or no difference,
    gives 1. With n pairs the smallest attainable p is 2^-n: 5 pairs reach 0.05 only when every one of them rose."""
    from scipy.stats import permutation_test

    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("rise_p needs two 1-D sequences of the same length")
    if not np.any(a != b):
        return 1.0
    if len(a) == 1:  # two sign assignments; the observed one is the larger only when it rose
        return 0.5 if a[0] > b[0] else 1.0
    result = permutation_test(
        (a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples", vectorized=True,
        n_resamples=2**exact_up_to, alternative="greater", rng=np.random.default_rng(0),
    )  # fmt: skip
    return float(result.pvalue)


def below(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """(AUROC, p): the chance that a value drawn from `x` lies below one drawn from `y` (ties count half), and the
    one-sided Mann–Whitney p-value that `x` tends lower. None when either side is empty."""
    from scipy.stats import mannwhitneyu

    if len(x) == 0 or len(y) == 0:
        return None
    test = mannwhitneyu(x, y, alternative="less")
    return 1.0 - float(test.statistic) / (len(x) * len(y)), float(test.pvalue)
