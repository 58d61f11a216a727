"""The persona-space formulas against slow, obviously-correct references (numpy or plain loops)."""

import itertools
import math

import numpy as np
import pytest
import torch

from personaxis.axis.calibration import default_window, sweep_windows
from personaxis.axis.space import (
    assistant_axis,
    check_percentile,
    cosine,
    pareto_front,
    pc1_cosine_by_layer,
    pca,
    percentile,
    project,
    role_count_stability,
    role_vectors,
)
from personaxis.axis.sweep import choose, mark_front
from personaxis.errors import PersonaxisError

L, H = 3, 5


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_role_vectors_keep_only_score_three_and_apply_the_minimum_count():
    means = {i: randn(L, H, seed=i) for i in range(9)}
    samples = [
        ("pirate", 3, means[0]),
        ("pirate", 3, means[1]),
        ("pirate", 2, means[2]),
        ("pirate", None, means[3]),
        ("cat", 3, means[4]),
        ("cat", 1, means[5]),
        ("monk", 3, means[6]),
        ("monk", 3, torch.full((L, H), math.nan)),
        ("monk", 3, means[8]),
        ("ghost", 0, means[7]),
    ]
    result = role_vectors(samples, min_count=2)
    assert list(result.vectors) == ["monk", "pirate"]
    torch.testing.assert_close(result.vectors["pirate"], (means[0] + means[1]) / 2)
    torch.testing.assert_close(result.vectors["monk"], (means[6] + means[8]) / 2)  # the empty reply never counts
    assert result.counts == {"cat": 1, "ghost": 0, "monk": 2, "pirate": 2}
    assert result.dropped == ["cat", "ghost"]
    assert list(role_vectors(samples, min_count=1).vectors) == ["cat", "monk", "pirate"]
    with pytest.raises(PersonaxisError, match="at least 1"):
        role_vectors(samples, min_count=0)


def test_axis_is_default_minus_mean_of_roles():
    default = randn(L, H, seed=1)
    roles = {name: randn(L, H, seed=10 + i) for i, name in enumerate(["a", "b", "c", "d"])}
    got = assistant_axis(default, roles)
    for layer in range(L):
        for h in range(H):
            mean = sum(float(v[layer, h]) for v in roles.values()) / len(roles)
            assert math.isclose(float(got[layer, h]), float(default[layer, h]) - mean, rel_tol=1e-5, abs_tol=1e-6)
    with pytest.raises(PersonaxisError, match="at least one role"):
        assistant_axis(default, {})


def test_pca_matches_numpy():
    x = randn(7, 12, seed=2) * torch.linspace(3, 0.1, 12)
    toward = randn(12, seed=3)
    got = pca(x, toward=toward)
    centred = x.double().numpy() - x.double().numpy().mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    ratio = eigenvalues[order] / eigenvalues.sum()
    assert got.components.shape == (6, 12)  # rank of 7 centred points
    np.testing.assert_allclose(got.variance_ratio.numpy(), ratio[:6], rtol=1e-4, atol=1e-6)
    for k in range(6):
        reference = eigenvectors[:, order[k]]
        assert abs(abs(float(got.components[k].double() @ torch.from_numpy(reference))) - 1) < 1e-4
        assert float(got.components[k] @ toward) >= 0  # oriented toward the axis
    np.testing.assert_allclose(got.scores.numpy(), (centred @ got.components.double().numpy().T), atol=1e-4)


def test_pc1_cosine_by_layer_matches_numpy():
    roles = randn(6, L, H, seed=4)
    roles[:, :, 0] *= 10  # a dominant direction
    axis = randn(L, H, seed=5)
    got = pc1_cosine_by_layer(roles, axis)
    for layer in range(L):
        x = roles[:, layer].double().numpy()
        _, _, vt = np.linalg.svd(x - x.mean(axis=0))
        a = axis[layer].double().numpy()
        want = abs(vt[0] @ a) / np.linalg.norm(a)
        assert math.isclose(got[layer], want, rel_tol=1e-4)


def _subset_figures(roles: np.ndarray, default: np.ndarray) -> tuple[float, float]:
    """|cos(PC1, axis)| and PC1's variance share of one subset, by eigen-decomposition of the covariance."""
    axis = default - roles.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(roles, rowvar=False))
    pc1 = eigenvectors[:, np.argmax(eigenvalues)]
    return abs(pc1 @ axis) / np.linalg.norm(axis), eigenvalues.max() / eigenvalues.sum()


def test_role_count_stability_matches_numpy_on_the_same_subsets():
    roles, default = randn(9, 6, seed=20).double(), randn(6, seed=21).double()
    roles[:, 0] *= 4
    got = role_count_stability(roles, default, [9, 3, 5], repeats=4, seed=7)
    assert [row["roles"] for row in got] == [3, 5, 9] and [row["subsets"] for row in got] == [4, 4, 1]
    draws = torch.Generator().manual_seed(7)  # the same draws, in the same order (sizes ascending)
    for row in got:
        figures = np.array(
            [
                _subset_figures(roles[torch.randperm(9, generator=draws)[: row["roles"]]].numpy(), default.numpy())
                for _ in range(row["subsets"])
            ]
        )
        for column, name in enumerate(("cosine", "pc1_variance")):
            values = figures[:, column]
            assert math.isclose(row[f"{name}_mean"], values.mean(), rel_tol=1e-4)
            assert math.isclose(row[f"{name}_sd"], values.std(ddof=1) if len(values) > 1 else 0.0, abs_tol=1e-5)
            assert math.isclose(row[f"{name}_p5"], np.percentile(values, 5), rel_tol=1e-4)
            assert math.isclose(row[f"{name}_p95"], np.percentile(values, 95), rel_tol=1e-4)


def test_role_count_stability_finds_a_planted_axis_at_every_size():
    direction = torch.zeros(16)
    direction[3] = 1.0
    spread = torch.linspace(-5, 5, 40)[:, None] * direction + 0.05 * randn(40, 16, seed=22)
    default = 8 * direction  # the Assistant sits at one end of the roles' main spread
    for row in role_count_stability(spread, default, [4, 40], repeats=10):
        assert row["cosine_p5"] > 0.95 and row["pc1_variance_p5"] > 0.9


@pytest.mark.parametrize(
    "sizes, repeats, match", [([1], 3, "between 2 and 5"), ([6], 3, "between 2"), ([3], 0, "repeats")]
)
def test_role_count_stability_refuses_impossible_subsets(sizes, repeats, match):
    with pytest.raises(PersonaxisError, match=match):
        role_count_stability(randn(5, 4), randn(4), sizes, repeats=repeats)


def test_project_and_cosine():
    h, v = randn(4, H, seed=6), randn(H, seed=7) * 3
    np.testing.assert_allclose(project(h, v).numpy(), h.numpy() @ v.numpy() / np.linalg.norm(v.numpy()), rtol=1e-5)
    assert math.isclose(cosine(v, 2 * v), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("q", [0, 1, 25, 50, 75, 99.5, 100])
def test_percentile_matches_numpy(q):
    values = randn(101, seed=8).tolist() + [math.nan]  # a NaN (empty reply) is ignored
    assert math.isclose(percentile(values, q), float(np.percentile(np.array(values[:-1]), q)), rel_tol=1e-12)


@pytest.mark.parametrize("bad", [-1, 100.01, 250, math.nan, math.inf])
def test_percentile_outside_0_100_is_refused(bad):
    with pytest.raises(PersonaxisError, match="between 0 and 100"):
        check_percentile(bad)
    with pytest.raises(PersonaxisError, match="between 0 and 100"):
        percentile([1.0, 2.0], bad)


def brute_front(points):
    def dominated(i):
        return any(
            a[0] <= points[i][0] and a[1] >= points[i][1] and (a[0] < points[i][0] or a[1] > points[i][1])
            for a in points
        )

    return sorted(i for i in range(len(points)) if not dominated(i))


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    # coarse values make ties and duplicates common
    points = [(float(rng.integers(0, 6)) / 5, float(rng.integers(0, 6)) / 5) for _ in range(rng.integers(1, 15))]
    assert sorted(pareto_front(points)) == brute_front(points)


def test_front_counts_no_cap_as_a_contender():
    baseline = {"id": "no_cap", "harm_rate": 0.11, "capability": 0.62}
    rows = [
        {"id": "p25", "harm_rate": 0.16, "capability": 0.62},  # no cap beats it: more harm, same capability
        {"id": "p50", "harm_rate": 0.09, "capability": 0.60},
        {"id": "p75", "harm_rate": 0.07, "capability": 0.58},
        {"id": "broken", "harm_rate": None, "capability": 0.9},
    ]
    mark_front(baseline, rows)
    assert baseline["pareto"] and [r["pareto"] for r in rows] == [False, True, True, False]


def vs(fewer: int, more: int, p: float) -> dict:
    return {"harm": {"fewer": fewer, "more": more, "p": p}}


def test_choose_the_least_harmful_front_point_within_the_capability_budget():
    baseline = {"harm_rate": 0.6, "capability": 0.80}
    rows = [
        {"id": "a", "layers": [1, 2], "harm_rate": 0.1, "capability": 0.70, "pareto": True},  # too costly
        {"id": "b", "layers": [1, 2, 3, 4], "harm_rate": 0.3, "capability": 0.79, "pareto": True},
        {"id": "c", "layers": [1, 2], "harm_rate": 0.3, "capability": 0.79, "pareto": True},  # same, fewer layers
        {"id": "d", "layers": [1], "harm_rate": 0.5, "capability": 0.81, "pareto": True},
    ]
    for r in rows:
        r["vs_no_cap"] = vs(30, 2, 1e-6)
    assert choose(rows, baseline, max_drop=2.0) == "c"
    assert choose(rows, baseline, max_drop=20.0) == "a"
    assert choose(rows, {"harm_rate": 0.05, "capability": 0.8}, max_drop=2.0) is None
    assert choose(rows, {"harm_rate": None, "capability": 0.8}, max_drop=2.0) is None


def test_choose_only_a_cut_beyond_chance_item_by_item():
    baseline = {"harm_rate": 0.11, "capability": 0.58}
    noise = {"id": "noise", "layers": [1], "harm_rate": 0.10, "capability": 0.58, "pareto": True}
    noise["vs_no_cap"] = vs(14, 13, 1.0)  # one reply fewer in all
    real = {"id": "real", "layers": [1, 2], "harm_rate": 0.06, "capability": 0.575, "pareto": True}
    real["vs_no_cap"] = vs(21, 9, 0.043)
    assert choose([noise], baseline, max_drop=2.0) is None
    assert choose([noise], baseline, max_drop=2.0, alpha=1.0) == "noise"  # the test waived
    assert choose([noise, real], baseline, max_drop=2.0) == "real"
    assert choose([noise, real], baseline, max_drop=2.0, alpha=0.01) is None
    real["vs_no_cap"] = vs(9, 21, 0.043)  # significant, but toward more harm
    assert choose([real], baseline, max_drop=2.0) is None


def test_windows_sit_in_the_upper_middle():
    assert default_window(64, 8) == list(range(46, 54))  # the paper's Qwen3-32B window
    assert default_window(4, 8) == [0, 1, 2, 3]
    windows = sweep_windows(30, (4, 8, 16), positions=3)
    assert all(w == list(range(w[0], w[-1] + 1)) and w[-1] < 30 for w in windows)
    assert {len(w) for w in windows} == {4, 8, 16}
    assert all(w[0] >= 11 for w in windows)  # nothing in the bottom third
    assert len({tuple(w) for w in windows}) == len(windows)
    assert sweep_windows(4, (2, 16), positions=2) == [[2, 3]]  # one position fits; a 16-layer window does not
    assert sweep_windows(30, (8,), positions=1) == [list(range(19, 27))]  # one position: the deepest
    with pytest.raises(PersonaxisError, match="no window size fits"):
        sweep_windows(4, (16,))
    for n, size in itertools.product(range(1, 40), (1, 4, 8)):
        window = default_window(n, size)
        assert window == list(range(window[0], window[0] + len(window))) and window[-1] < n
