"""Persona-space math: role vectors, the Assistant Axis, PCA, projections, τ percentiles and Pareto fronts.

Pure functions on tensors, so every formula of science.md §2 can be checked against a slow reference without a model.
All reductions run in float32 (percentiles in float64, to match numpy's definition exactly), whatever the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from personaxis.errors import PersonaxisError

__all__ = [
    "PCA",
    "RoleVectors",
    "assistant_axis",
    "check_percentile",
    "cosine",
    "pareto_front",
    "pca",
    "pc1_cosine_by_layer",
    "percentile",
    "project",
    "role_count_stability",
    "role_vectors",
]


@dataclass
class RoleVectors:
    """Role vectors that passed the filter, and how many qualifying replies every role had (dropped ones too)."""

    vectors: dict[str, torch.Tensor]  # role -> [L, H]
    counts: dict[str, int]  # role -> replies with the kept score
    min_count: int

    @property
    def dropped(self) -> list[str]:
        return sorted(role for role, n in self.counts.items() if role not in self.vectors)


def role_vectors(
    samples: Iterable[tuple[str, int | None, torch.Tensor]], *, min_count: int, keep_score: int = 3
) -> RoleVectors:
    """Mean response-mean of each role's replies scored `keep_score` (fully in role); roles below `min_count` dropped.

    `samples` are (role, score or None when unjudged/undefined, [L, H] response mean). Replies with no content
    tokens (a NaN mean) cannot be averaged and never count.
    """
    if min_count < 1:
        raise PersonaxisError(f"the minimum count of role replies must be at least 1, got {min_count}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for role, score, mean in samples:
        counts.setdefault(role, 0)
        if score != keep_score or not bool(torch.isfinite(mean).all()):
            continue
        sums[role] = sums.get(role, 0) + mean.float()
        counts[role] += 1
    kept = {role: sums[role] / n for role, n in counts.items() if n >= min_count}
    return RoleVectors(dict(sorted(kept.items())), dict(sorted(counts.items())), min_count)


def assistant_axis(default: torch.Tensor, roles: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """a_i = default_i − mean over roles of role_i, at every layer ([L, H]); points toward the Assistant."""
    if not roles:
        raise PersonaxisError("no role vectors: the axis needs at least one role that passed the filter")
    stacked = torch.stack([v.float() for v in roles.values()])
    return default.float() - stacked.mean(dim=0)


@dataclass
class PCA:
    """Principal components of a set of vectors (rows of `components` are unit directions)."""

    mean: torch.Tensor  # [H]
    components: torch.Tensor  # [K, H]
    variance_ratio: torch.Tensor  # [K], share of the total variance of each component
    scores: torch.Tensor  # [N, K], the inputs' coordinates along the components


def pca(x: torch.Tensor, *, toward: torch.Tensor | None = None, k: int | None = None) -> PCA:
    """Mean-centred PCA of the rows of `x` [N, H] by SVD in float32.

    An SVD's signs are arbitrary; with `toward` given, each component is flipped so that its cosine with `toward` is
    non-negative (PC1 then points toward the Assistant when `toward` is the axis); otherwise the largest-magnitude
    coordinate of each component is made positive, so that results are reproducible.
    """
    x = x.float()
    if x.dim() != 2 or x.shape[0] < 2:
        raise PersonaxisError(f"PCA needs at least two vectors, got {tuple(x.shape)}")
    mean = x.mean(dim=0)
    centred = x - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    variance = s.square()
    total = float(variance.sum())
    rank = min(x.shape[0] - 1, x.shape[1])
    k = rank if k is None else min(k, rank)
    components = vh[:k].clone()
    if toward is not None:
        signs = torch.sign(components @ toward.float())
    else:
        signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)).squeeze(1))
    components *= torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    ratio = variance[:k] / total if total > 0 else torch.zeros(k)
    return PCA(mean, components, ratio, centred @ components.T)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def pc1_cosine_by_layer(roles: torch.Tensor, axis: torch.Tensor) -> list[float]:
    """|cos(PC1, axis)| at every layer, with a separate PCA per layer; `roles` [R, L, H], `axis` [L, H]."""
    return [abs(cosine(pca(roles[:, layer], k=1).components[0], axis[layer])) for layer in range(axis.shape[0])]


def role_count_stability(
    roles: torch.Tensor, default: torch.Tensor, sizes: Sequence[int], *, repeats: int, seed: int = 0
) -> list[dict[str, float | int]]:
    """How much |cos(PC1, axis)| and PC1's variance share owe to which roles were drawn, and how they grow with more.

    For each size n, `repeats` random subsets of n of the role vectors `roles` [R, H] (one layer), each analysed as a
    build with only those roles would be: its own axis (default − subset mean) and its own PCA. A size equal to R
    has one subset, the full set. Returns per size the mean, standard deviation and 5th/95th percentiles of both.
    """
    n_roles = roles.shape[0]
    if repeats < 1:
        raise PersonaxisError(f"repeats must be at least 1, got {repeats}")
    for n in sizes:
        if not 2 <= n <= n_roles:
            raise PersonaxisError(f"a subset needs between 2 and {n_roles} roles (those in the build), got {n}")
    generator = torch.Generator().manual_seed(seed)
    roles, default = roles.float(), default.float()
    out: list[dict[str, float | int]] = []
    for n in sorted(set(sizes)):
        cosines, shares = [], []
        for _ in range(1 if n == n_roles else repeats):
            subset = roles[torch.randperm(n_roles, generator=generator)[:n]]
            axis = default - subset.mean(dim=0)
            space = pca(subset, k=1)
            cosines.append(abs(cosine(space.components[0], axis)))
            shares.append(float(space.variance_ratio[0]))
        row: dict[str, float | int] = {"roles": n, "subsets": len(cosines)}
        for name, values in (("cosine", cosines), ("pc1_variance", shares)):
            t = torch.tensor(values, dtype=torch.float64)
            row |= {
                f"{name}_mean": float(t.mean()),
                f"{name}_sd": float(t.std(correction=1)) if len(values) > 1 else 0.0,
                f"{name}_p5": percentile(t, 5),
                f"{name}_p95": percentile(t, 95),
            }
        out.append(row)
    return out


def project(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h · v / ‖v‖ along the last dimension (float32)."""
    v = v.float()
    return h.float() @ (v / v.norm())


def check_percentile(value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise PersonaxisError(f"a percentile must be between 0 and 100, got {value:g}")
    return value


def percentile(values: torch.Tensor | Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between order statistics (numpy's default)."""
    q = check_percentile(q)
    data = torch.as_tensor(values, dtype=torch.float64).flatten()
    data = data[torch.isfinite(data)]
    if data.numel() == 0:
        raise PersonaxisError("no finite values to take a percentile of")
    return float(torch.quantile(data, q / 100.0))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (harm, capability) that no other point beats: lower harm and higher capability.

    A point is dominated when another is at least as good on both and strictly better on one. Sorted by harm.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best or (front and tuple(points[i]) == tuple(points[front[-1]])):
            front.append(i)
            best = max(best, points[i][1])
    return front
