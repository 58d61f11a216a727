"""Plot several `cap sweep` runs of one model and axis as one front: python merge_sweeps.py OUT.png A.json B.json ...

Each run's sweep.json keeps only its own settings; runs that share a baseline (same model, axis, items and settings)
can be drawn together. Refuses runs whose baselines differ.
"""

import json
import sys
from pathlib import Path

from personaxis.axis.plots import sweep_front
from personaxis.axis.sweep import mark_front

out, *paths = sys.argv[1:]
runs = [json.loads(Path(p).read_text()) for p in paths]
baseline = runs[0]["baseline"]
for path, run in zip(paths, runs, strict=True):
    if {k: run["baseline"][k] for k in ("harmful", "judged", "correct", "graded")} != {
        k: baseline[k] for k in ("harmful", "judged", "correct", "graded")
    }:
        sys.exit(f"{path}: its no-cap baseline differs from {paths[0]}'s; these sweeps cannot share a plot")
rows = list({r["id"]: r for run in runs for r in run["rows"]}.values())
mark_front(baseline, rows)
sweep_front(Path(out), rows, baseline, None)
print(f"{len(rows)} settings from {len(runs)} runs -> {out}")
