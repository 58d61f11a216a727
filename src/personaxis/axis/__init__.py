"""The Assistant Axis (science.md §2): build it, measure drift along it, cap activations on it.

- `library`, `evals`: the packaged roles, questions, rubrics, traits and evaluation sets;
- `build`: rollouts → role-adoption judging → role vectors, the axis, persona-space PCA, trait vectors;
- `space`: the formulas (axis, PCA, projections, percentiles, Pareto fronts) as pure tensor functions;
- `drift`: per-turn projections of multi-turn conversations, scripted or with a simulated user;
- `capping`: τ calibration, the layer-window sweep and capped replay;
- `report`, `plots`: Markdown and PNG from the JSON the commands write; `cli`: the commands.

Names are re-exported lazily, so importing a data loader does not pull in the model stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AxisBuild": "build",
    "BuildConfig": "build",
    "QUICK": "build",
    "build_axis": "build",
    "assistant_axis": "space",
    "pareto_front": "space",
    "pca": "space",
    "percentile": "space",
    "project": "space",
    "role_vectors": "space",
    "drift_stats": "drift",
    "run_scripted": "drift",
    "run_simulated": "drift",
    "turn_projections": "drift",
    "calibrate": "capping",
    "cap_config": "capping",
    "pooled_projections": "capping",
    "replay": "capping",
    "sweep": "capping",
    "sweep_windows": "capping",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"personaxis.axis.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'personaxis.axis' has no attribute {name!r}")
