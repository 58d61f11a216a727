"""A build's analysis from its stored rollouts: role vectors, the axis, persona-space PCA, traits, and the summary.

Cheap and always recomputed from the records (science.md §2.2–2.4), so a rerun with other filters needs no model.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from personaxis.axis.library import DEFAULT_ROLE
from personaxis.axis.space import PCA, RoleVectors, assistant_axis, cosine, pc1_cosine_by_layer, pca, role_vectors
from personaxis.errors import PersonaxisError
from personaxis.store import Record


@dataclass
class AxisAnalysis:
    """What `analyse` computes: per-layer tensors [L, H] and the summary numbers."""

    vectors: dict[str, torch.Tensor]  # the kept roles' vectors and the default's (under DEFAULT_ROLE)
    default: torch.Tensor
    axis: torch.Tensor
    traits: dict[str, torch.Tensor]
    space: PCA  # at the target layer
    summary: dict[str, Any]


@dataclass
class _Gathered:
    """The stored rollouts sorted by kind."""

    role_samples: list[tuple[str, int | None, torch.Tensor]]
    default_means: list[torch.Tensor]
    trait_sides: dict[str, dict[str, list[torch.Tensor]]]
    as_ai_by_role: dict[str, list[bool]]  # per role, for each reply with content: does it speak as an AI
    empty: int


def _finite(record: Record) -> torch.Tensor | None:
    mean = record.tensors.get("response")
    return mean if mean is not None and bool(torch.isfinite(mean).all()) else None


def _gather(
    records: dict[str, Record],
    labels: dict[str, dict[str, Any]],
    scores: dict[str, int | None] | None,
    keep_score: int,
    as_ai: Collection[str],
    dropped: Collection[str],
) -> _Gathered:
    found = _Gathered([], [], {}, {}, 0)
    for rid, record in records.items():
        label = labels[rid]
        mean = _finite(record)
        if mean is None:
            found.empty += 1
            if label["kind"] == "role":
                found.role_samples.append((label["role"], None, torch.tensor(math.nan)))  # counted, never averaged
            continue
        if label["kind"] == "role":
            score = None if rid in dropped else keep_score if scores is None else scores.get(rid)
            found.role_samples.append((label["role"], score, mean))
            found.as_ai_by_role.setdefault(label["role"], []).append(rid in as_ai)
        elif label["kind"] == "default":
            found.default_means.append(mean)
        elif label["kind"] == "trait":
            found.trait_sides.setdefault(label["trait"], {"pos": [], "neg": []})[label["side"]].append(mean)
    return found


def _too_few(filtered: RoleVectors, scores: Any, screen: bool, keep_score: int, min_count: int) -> PersonaxisError:
    if scores is not None:
        what, hint = f"replies scored {keep_score}", "; lower --min-count, use a stronger judge, or --judge none"
    elif screen:
        what, hint = "replies that do not present themselves as an AI", "; lower --min-count"
    else:
        what, hint = "replies with content", ""
    return PersonaxisError(
        f"only {len(filtered.vectors)} role(s) have at least {min_count} {what}{hint} (counts: {filtered.counts})"
    )


def _score_table(
    records: dict[str, Record],
    labels: dict[str, dict[str, Any]],
    scores: dict[str, int | None] | None,
    dropped: Collection[str],
    screen: bool,
) -> dict[str, dict[str, int]]:
    """Per role, how many replies were empty, screened, kept unjudged, or got each score."""
    table: dict[str, dict[str, int]] = {}
    for rid, label in labels.items():
        if label["kind"] != "role":
            continue
        row = table.setdefault(label["role"], {})
        if _finite(records[rid]) is None:
            key = "empty"
        elif rid in dropped:
            key = "screened"
        elif scores is None:
            key = "kept" if screen else "unjudged"
        else:
            key = "undefined" if scores.get(rid) is None else str(scores[rid])
        row[key] = row.get(key, 0) + 1
    return dict(sorted(table.items()))


def analyse(
    model_info: dict[str, Any],
    records: dict[str, Record],
    labels: dict[str, dict[str, Any]],
    scores: dict[str, int | None] | None,
    *,
    min_count: int,
    target_layer: int,
    keep_score: int = 3,
    as_ai: Collection[str] = frozenset(),
    screen: bool = False,
) -> AxisAnalysis:
    """Role vectors, default vector, axis, trait vectors, PCA and the summary numbers from stored rollouts.

    `scores` None means unjudged: every role reply counts as fully in role. With `screen`, the replies in `as_ai`
    (those that present themselves as an AI) never count.
    """
    dropped = as_ai if screen else frozenset()
    found = _gather(records, labels, scores, keep_score, as_ai, dropped)
    if not found.default_means:
        raise PersonaxisError("no default reply has any content: the default vector cannot be computed")
    filtered = role_vectors(found.role_samples, min_count=min_count, keep_score=keep_score)
    if len(filtered.vectors) < 2:
        raise _too_few(filtered, scores, screen, keep_score, min_count)
    default = torch.stack(found.default_means).mean(dim=0)
    axis = assistant_axis(default, filtered.vectors)
    names = list(filtered.vectors)
    stacked = torch.stack([filtered.vectors[n] for n in names])  # [R, L, H]
    space = pca(stacked[:, target_layer], toward=axis[target_layer])
    traits = {
        name: torch.stack(sides["pos"]).mean(0) - torch.stack(sides["neg"]).mean(0)
        for name, sides in sorted(found.trait_sides.items())
        if sides["pos"] and sides["neg"]
    }
    summary = {
        **model_info,
        "target_layer": target_layer,
        "counts": {
            "rollouts": len(records),
            "empty_replies": found.empty,
            "role_replies": sum(1 for lab in labels.values() if lab["kind"] == "role"),
            "default_replies": len(found.default_means),
            "trait_replies": sum(len(s["pos"]) + len(s["neg"]) for s in found.trait_sides.values()),
        },
        "scores": _score_table(records, labels, scores, dropped, screen),
        "roles": {
            "kept": names,
            "dropped": {role: filtered.counts[role] for role in filtered.dropped},
            "fully_in_role_counts": filtered.counts,
            "min_count": min_count,
        },
        **_space_summary(names, stacked, default, axis, space, traits, target_layer, found.as_ai_by_role),
    }
    return AxisAnalysis({**filtered.vectors, DEFAULT_ROLE: default}, default, axis, traits, space, summary)


def _space_summary(
    names: list[str],
    stacked: torch.Tensor,
    default: torch.Tensor,
    axis: torch.Tensor,
    space: PCA,
    traits: dict[str, torch.Tensor],
    target: int,
    as_ai_by_role: dict[str, list[bool]],
) -> dict[str, Any]:
    """The summary's "pca", "axis", "ai_self_reference" and "traits" parts."""
    n_pcs = min(3, space.components.shape[0])
    cumulative = torch.cumsum(space.variance_ratio, 0).tolist()
    default_coords = ((default[target] - space.mean) @ space.components.T).tolist()
    cos_by_layer = pc1_cosine_by_layer(stacked, axis)
    return {
        "pca": {
            "layer": target,
            "variance_ratio": space.variance_ratio.tolist(),
            "cumulative": cumulative,
            "pcs_for_70_percent": next((i + 1 for i, c in enumerate(cumulative) if c >= 0.7), len(cumulative)),
            "pc1_variance": float(space.variance_ratio[0]),
            "orientation": "each PC's sign is chosen so that its cosine with the axis is non-negative",
            "role_coordinates": {n: space.scores[i, :n_pcs].tolist() for i, n in enumerate(names)},
            "default_coordinates": default_coords[:n_pcs],
        },
        "axis": {
            "norm_by_layer": axis.norm(dim=-1).tolist(),
            "pc1_cosine_by_layer": cos_by_layer,
            "pc1_cosine_at_target": cos_by_layer[target],
        },
        "ai_self_reference": _self_reference(as_ai_by_role, names, space.scores[:, 0].tolist()),
        "traits": {
            name: {
                "cosine_with_axis": cosine(vector[target], axis[target]),
                "cosine_with_pcs": [cosine(vector[target], space.components[k]) for k in range(n_pcs)],
            }
            for name, vector in traits.items()
        },
    }


def _self_reference(replies: dict[str, list[bool]], kept: list[str], pc1: list[float]) -> dict[str, Any]:
    """How many replies present themselves as an AI, per role, and Spearman's ρ of that share with PC1 over roles.

    A ρ near ±1 says PC1 orders the roles by how often they were declined, not by what they are.
    """
    share = {role: sum(flags) / len(flags) for role, flags in sorted(replies.items())}
    rho = p = None
    xs = [share[n] for n in kept]
    if len(kept) >= 3 and len(set(xs)) > 1 and len(set(pc1)) > 1:
        from scipy.stats import spearmanr

        result = spearmanr(xs, pc1)
        rho, p = float(result.statistic), float(result.pvalue)
    total = sum(len(flags) for flags in replies.values())
    return {
        "replies": sum(sum(flags) for flags in replies.values()),
        "of": total,
        "share_by_role": share,
        "pc1_spearman": rho,
        "pc1_spearman_p": p,
    }


def persona_space_view(vectors: dict[str, torch.Tensor], axis: torch.Tensor, space: PCA, layer: int) -> dict[str, Any]:
    """Roles (and the default) on PC1 × PC2 for a dashboard, plus `axis_x` = (scale, offset) mapping a projection on
    â at `layer` to a PC1 coordinate: a least-squares line through the roles' own (projection, PC1) pairs."""
    unit = axis.float() / axis.norm()
    names = list(vectors)
    points = torch.stack([vectors[n][layer].float() for n in names])
    coords = (points - space.mean) @ space.components[:2].T
    projections = points @ unit
    design = torch.stack([projections, torch.ones_like(projections)], dim=1).double()
    scale, offset = torch.linalg.lstsq(design, coords[:, 0:1].double()).solution.flatten().tolist()
    return {
        "layer": layer,
        "points": [
            {"name": n, "x": float(c[0]), "y": float(c[1]) if c.numel() > 1 else 0.0}
            for n, c in zip(names, coords, strict=True)
        ],
        "axis_x": [scale, offset],
    }
