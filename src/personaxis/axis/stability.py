"""Role-count stability of a build: how |cos(PC1, axis)| and PC1's variance share depend on which roles, and how many,
a build used. The build's analysis redone on random subsets of its role vectors (no model, seconds); the stage writes
RUN/stability.json and its plot, which the report includes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personaxis.axis.runfiles import PLOTS, STABILITY, load_summary, role_matrix, write_json
from personaxis.axis.space import role_count_stability


def stability(
    run_dir: str | Path,
    sizes: Sequence[int] | None = None,
    *,
    repeats: int = 50,
    layer: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Subsets of `sizes` roles (default 8, 16, 32... and all) at `layer` (default the build's target layer), `repeats`
    each; returns stability.json's content and the files written."""
    from personaxis.axis.plots import role_count_stability as plot

    run = Path(run_dir)
    layer = load_summary(run)["target_layer"] if layer is None else layer
    names, roles, default = role_matrix(run, layer)
    counts = list(sizes) if sizes else [*(2**e for e in range(3, 12) if 2**e < len(names)), len(names)]
    rows = role_count_stability(roles, default, counts, repeats=repeats, seed=seed)
    result = {"layer": layer, "roles_in_build": len(names), "repeats": repeats, "seed": seed, "rows": rows}
    files = {"json": write_json(run / STABILITY, result)}
    files["plot"] = plot(run / PLOTS / "stability.png", result)
    return result, files
