"""The files of a trait run folder, next to the run store's own (manifest.json, records.sqlite).

One folder per (trait, model) holds everything about it, so `trait report DIR` needs nothing else:

    vectors.safetensors   the persona vectors (+ prompt-mean and last-prompt variants), calibration in the metadata
    samples.jsonl         every extraction reply with its scores and whether its pair was kept
    calibration.json/png  the steering sweep (layer × strength) and the choice made from it
    monitor.json/png      the monitoring experiment (last-prompt projection vs judged trait score)
    report.md + *.png     the human-readable summary
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from personaxis.common import datasets
from personaxis.store import atomic_write_text

VECTORS = "vectors.safetensors"
SAMPLES = "samples.jsonl"
CALIBRATION = "calibration.json"
CALIBRATION_PLOT = "calibration.png"
MONITOR = "monitor.json"
MONITOR_PLOT = "monitor.png"
REPORT = "report.md"


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return Path(path)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    atomic_write_text(path, text)
    return Path(path)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [record for _, record in datasets.read_jsonl(path)]


def slug(text: str) -> str:
    """A folder-name-safe version of a model spec ('Qwen/Qwen2.5-7B' -> 'qwen2.5-7b')."""
    base = str(text).rstrip("/").rsplit("/", 1)[-1].lower()
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip("-.") or "model"
