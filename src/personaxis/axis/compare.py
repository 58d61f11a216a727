"""Do two axis builds order the roles alike? The paper finds role loadings on PC1 agree across models (r > 0.92).

Two builds (two models, or one model under two settings) are compared on the roles they share: each role's PC1
coordinate at its build's target layer, and its projection on the build's own unit axis relative to the mean role.
Both are oriented toward the Assistant in every build, so the signs are comparable across models.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from personaxis.axis.runfiles import ARTIFACTS, load_summary, role_matrix, write_json
from personaxis.errors import PersonaxisError

MEASURES = ("pc1", "axis")


def agreement(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any]:
    """Pearson and Spearman correlation of two role → value maps over the roles they share."""
    from scipy import stats

    shared = sorted(set(a) & set(b))
    if len(shared) < 3:
        raise PersonaxisError(f"the builds share {len(shared)} role(s); a correlation needs at least 3")
    xs, ys = [a[r] for r in shared], [b[r] for r in shared]
    if min(xs) == max(xs) or min(ys) == max(ys):
        raise PersonaxisError("one build gives every shared role the same value: no correlation to compute")
    pearson, spearman = stats.pearsonr(xs, ys), stats.spearmanr(xs, ys)
    return {
        "roles": len(shared),
        "pearson_r": float(pearson.statistic),
        "pearson_p": float(pearson.pvalue),
        "spearman_rho": float(spearman.statistic),
        "spearman_p": float(spearman.pvalue),
    }


def role_positions(run_dir: str | Path) -> dict[str, Any]:
    """Each kept role's PC1 coordinate and its projection on the unit axis (minus the mean role's) at the target
    layer of a build, with what identifies the build."""
    from personaxis.vectors import Vectors

    run = Path(run_dir)
    summary = load_summary(run)
    layer = summary["target_layer"]
    pc1 = {role: coords[0] for role, coords in summary["pca"]["role_coordinates"].items()}
    axis = Vectors.load(run / "artifacts" / ARTIFACTS["axis"])
    names, roles, _ = role_matrix(run, layer)
    projections = roles @ axis.units("axis")[axis.layers.index(layer)]
    centred = projections - projections.mean()
    return {
        "run": str(run),
        "model": summary["model"],
        "layer": layer,
        "n_layers": summary["n_layers"],
        "pc1": pc1,
        "axis": {n: float(p) for n, p in zip(names, centred, strict=True)},
    }


def compare_builds(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    a, b = role_positions(run_a), role_positions(run_b)
    result: dict[str, Any] = {"builds": [{k: v for k, v in x.items() if k not in MEASURES} for x in (a, b)]}
    for measure in MEASURES:
        result[measure] = agreement(a[measure], b[measure])
        shared = sorted(set(a[measure]) & set(b[measure]))
        result[measure]["values"] = {r: [a[measure][r], b[measure][r]] for r in shared}
    return result


def write_comparison(
    run_a: str | Path, run_b: str | Path, out: str | Path | None = None
) -> tuple[dict[str, Any], Path, Path]:
    """`compare_builds` written as JSON at `out` (default RUN_A/compare_<RUN_B name>.json) with a plot of the PC1
    loadings beside it (same name, .png); returns the result, the JSON's path and the plot's."""
    from personaxis.axis.plots import role_agreement

    result = compare_builds(run_a, run_b)
    out = write_json(out or Path(run_a) / f"compare_{Path(run_b).resolve().name}.json", result)
    return result, out, role_agreement(out.with_suffix(".png"), result)
