"""The files of an axis run folder: their names, one writer for the JSON ones, and the readers of a build's.

Every stage writes its own files here (the build summary.json, space.json and artifacts/; calibration, the sweep,
drift and stability their JSON), and `report` reads them back: the folder is the interface between the stages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from personaxis.axis.library import DEFAULT_ROLE
from personaxis.common.datasets import read_json
from personaxis.errors import PersonaxisError
from personaxis.inference.steering import default_layer
from personaxis.model.loading import ChatModel
from personaxis.store import RunStore, atomic_write_text
from personaxis.vectors import Vectors

NO_JUDGE = "none"  # the judge spec of an unjudged build, as summary.json records it
SUMMARY = "summary.json"
SPACE = "space.json"  # the persona-space view `personaxis serve` can show
DRIFT = "drift.json"
CALIBRATION = "calibration.json"
SWEEP = "sweep.json"
STABILITY = "stability.json"
REPORT = "report.md"
PLOTS = "plots"
ARTIFACTS_DIR = "artifacts"
ARTIFACTS = {
    "axis": "axis.safetensors",
    "roles": "roles.safetensors",
    "traits": "traits.safetensors",
    "pca": "pca.safetensors",
    "cap": "cap.safetensors",  # `cap calibrate`
    "cap_chosen": "cap_chosen.safetensors",  # `cap sweep`
}


def write_json(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON, written atomically (parents made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise PersonaxisError(f"{run_dir} has no {SUMMARY}: run `personaxis axis build --run {run_dir}` first")
    return read_json(path)


def build_store(run_dir: str | Path, model_name: str) -> RunStore:
    """The run store of a finished build of `model_name` (its rollouts are what calibration pools)."""
    summary = load_summary(run_dir)
    if summary["model"] != model_name:
        raise PersonaxisError(f"{run_dir} is a build of {summary['model']}, not {model_name}")
    return RunStore(run_dir)


def run_of(axis: str | Path) -> Path:
    """The build run folder an axis artifact lives in (RUN/artifacts/axis.safetensors)."""
    run = Path(axis).resolve().parent.parent
    if not (run / SUMMARY).is_file():
        raise PersonaxisError(f"{axis} is not inside a build run folder: pass --run DIR")
    return run


def role_matrix(run_dir: str | Path, layer: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """A build's kept role names, their vectors [R, H] and the default vector [H] at `layer`, from its artifacts."""
    vectors = Vectors.load(Path(run_dir) / ARTIFACTS_DIR / ARTIFACTS["roles"])
    if layer not in vectors.layers:
        raise PersonaxisError(f"layer {layer} is not in the build (layers {vectors.layers[0]}–{vectors.layers[-1]})")
    if DEFAULT_ROLE not in vectors.names:
        raise PersonaxisError(f"{run_dir}: the role vectors lack the '{DEFAULT_ROLE}' vector")
    k = vectors.layers.index(layer)
    names = [n for n in vectors.names if n != DEFAULT_ROLE]
    return names, torch.stack([vectors.data[n][k] for n in names]), vectors.data[DEFAULT_ROLE][k]


def axis_name(axis: Vectors) -> str:
    """The axis's direction in an artifact: the one called "axis", else its only one."""
    return "axis" if "axis" in axis.names else axis.resolve(None)


def load_axis(
    path: str | Path, model: ChatModel, log: Callable[[str], None] = lambda message: None
) -> tuple[Vectors, int]:
    """An axis artifact checked against `model` (each warning logged), and the layer it is used at
    (`inference.steering.default_layer`: the build's target layer)."""
    axis = Vectors.load(path)
    for warning in axis.validate(model):
        log(f"warning: {warning}")
    return axis, default_layer(axis)
