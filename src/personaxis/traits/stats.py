"""The two correlations the trait figures report, in plain numpy (no statistics package needed for two formulas).

Both return None when the correlation is undefined (fewer than two points, or a constant variable) instead of NaN, so
reports can say "undefined" rather than print a number that is not one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r between two equally long sequences."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("pearson needs two 1-D sequences of the same length")
    if len(a) < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if denominator == 0.0:
        return None
    return float(np.clip((a * b).sum() / denominator, -1.0, 1.0))


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (the convention Spearman's ρ needs)."""
    values = np.asarray(x, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        out[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ: Pearson's r of the ranks."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of the same length")
    return pearson(ranks(x), ranks(y))
