"""The Assistant Axis (science.md §2): build it, measure drift along it, cap activations on it.

- `library`, `evals`: the packaged roles, questions, rubrics, traits and evaluation sets (one module per set);
- `build`: the build's stage: rollouts (planned in `rollouts`) → role-adoption judging → `analysis` (role vectors,
  the axis, persona-space PCA, trait vectors) → artifacts, summary and report;
- `space`: the formulas (axis, PCA, projections, percentiles, Pareto fronts) as pure tensor functions;
- `drift`: per-turn projections of multi-turn conversations, scripted or with a simulated user;
- `calibration`: τ from a build's rollouts and the layer windows; `sweep`: the window × percentile sweep, scored by
  `outcomes`; `replay`: the same user turns with and without a cap;
- `stability`, `compare`: a build's role-count stability, and two builds against each other;
- `runfiles`: the run folder's files, which every stage writes and `report` (with `plots`) reads.

Names are re-exported lazily, so importing a data loader does not pull in the model stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AxisAnalysis": "analysis",
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
    "DriftConfig": "drift",
    "drift_stats": "drift",
    "run_drift": "drift",
    "run_scripted": "drift",
    "run_simulated": "drift",
    "turn_projections": "drift",
    "CalibrationConfig": "calibration",
    "calibrate": "calibration",
    "calibrate_cap": "calibration",
    "cap_config": "calibration",
    "pooled_projections": "calibration",
    "sweep_windows": "calibration",
    "replay": "replay",
    "SweepConfig": "sweep",
    "sweep": "sweep",
    "stability": "stability",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"personaxis.axis.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'personaxis.axis' has no attribute {name!r}")
