"""τ calibration for capping along the Assistant Axis (science.md §2.6), and the layer windows a cap covers.

Convention: a **floor on â**, â the unit Assistant Axis pointing toward the default Assistant:
``h ← h + â · max(τ − h·â, 0)`` at every token of every layer in the window, τ in the units of the projection h·â.
Activations already at least as Assistant-like as τ are untouched. (The reference code's ceiling on û = −â at −τ is
the same operation; `CapConfig.as_ceiling` converts.)

τ at layer i is a percentile of the projections on â_i of the response means of every role, trait and default
rollout of a build (calibrated on response means, applied per token, as in the paper). `calibrate_cap` is the stage:
it writes the cap config and calibration.json into the build's run folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from personaxis.axis.rollouts import ROLLOUT_STAGE
from personaxis.axis.runfiles import ARTIFACTS, ARTIFACTS_DIR, CALIBRATION, axis_name, build_store, write_json
from personaxis.axis.space import check_percentile, percentile
from personaxis.errors import PersonaxisError
from personaxis.store import RunStore
from personaxis.vectors import CapConfig, Vectors

CONVENTION = (
    "floor on the unit Assistant Axis â (pointing toward the default Assistant): h <- h + â·max(τ − h·â, 0) at every "
    "token of every capped layer; τ is in units of the projection h·â"
)
POOLED_KINDS = ("role", "trait", "default")
DEFAULT_PERCENTILES = (1.0, 25.0, 50.0, 75.0)


def pooled_projections(store: RunStore, axis: Vectors, *, name: str | None = None) -> torch.Tensor:
    """[N, L] projections on â (per layer of the axis) of the response means of a build's role, trait and default
    rollouts; replies without content are skipped. Read page by page, so memory stays flat in N."""
    units = axis.units(name)  # [L, H]
    rows = []
    for _, record in store.items(ROLLOUT_STAGE):
        if record.data.get("labels", {}).get("kind") not in POOLED_KINDS:
            continue
        mean = record.tensors.get("response")
        if mean is None or not bool(torch.isfinite(mean).all()):
            continue
        if mean.shape[0] != len(axis.layers):
            raise PersonaxisError(f"the run's rollouts have {mean.shape[0]} layers, the axis {len(axis.layers)}")
        rows.append((mean.float() * units).sum(dim=-1))
    if not rows:
        raise PersonaxisError(f"{store.path} holds no role, trait or default rollouts to calibrate on")
    return torch.stack(rows)


def calibrate(projections: torch.Tensor, layers: Sequence[int], q: float) -> dict[int, float]:
    """τ per layer: the q-th percentile (0–100) of the pooled projections; `layers` name the columns."""
    check_percentile(q)
    return {layer: percentile(projections[:, j], q) for j, layer in enumerate(layers)}


def cap_config(
    axis: Vectors, tau: dict[int, float], window: Sequence[int], q: float, source: str, *, name: str | None = None
) -> CapConfig:
    """A floor CapConfig on the axis over `window`, its convention and calibration spelled out in the metadata."""
    missing = [i for i in window if i not in tau]
    if missing:
        raise PersonaxisError(f"no τ for layer(s) {missing}: the axis covers layers {sorted(tau)}")
    config = CapConfig.from_vectors(
        axis, {i: tau[i] for i in window}, name=name, kind="floor", percentile=q, calibration_source=source
    )
    config.meta.points_toward = "the default Assistant (a floor on the projection onto the unit axis)"
    config.meta.extra = {**config.meta.extra, "convention": CONVENTION, "pooled": list(POOLED_KINDS)}
    return config


def default_window(n_layers: int, size: int = 8) -> list[int]:
    """`size` layers ending at 85% of the depth (the paper's Qwen3-32B window, 46–53 of 64, scaled)."""
    size = max(1, min(size, n_layers))
    end = min(n_layers, max(size, round(0.85 * n_layers)))
    return list(range(end - size, end))


def sweep_windows(n_layers: int, sizes: Sequence[int] = (4, 8, 16), positions: int = 3) -> list[list[int]]:
    """Windows of each size, their starts spread evenly across the upper middle of the network (45%–90% depth)."""
    if positions < 1:
        raise PersonaxisError(f"--positions must be at least 1, got {positions}")
    out: list[list[int]] = []
    for size in sizes:
        if size < 1:
            raise PersonaxisError(f"a window needs at least 1 layer, got {size}")
        if size > n_layers:
            continue
        lo = round(0.45 * n_layers)
        hi = max(0, min(round(0.9 * n_layers) - size, n_layers - size))
        lo = min(lo, hi)
        # counted down from the top, so that a single position is the deepest (closest to the paper's windows)
        starts = sorted({round(hi - (hi - lo) * k / max(positions - 1, 1)) for k in range(positions)})
        out += [list(range(s, s + size)) for s in starts]
    if not out:
        raise PersonaxisError(f"no window size fits a model with {n_layers} layers")
    return out


@dataclass(frozen=True)
class CalibrationConfig:
    """What `calibrate_cap` does: τ at `percentile` (0–100) over a window of layers."""

    percentile: float = 25.0
    layers: str | tuple[int, ...] | None = None  # the window: "a:b", "i,j,k" or the layers; None: `default_window`
    window_size: int = 8  # the size of the default window

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentile", check_percentile(self.percentile))
        if self.layers is not None and not isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def window(self, n_layers: int) -> list[int]:
        from personaxis.common.datasets import parse_layers

        if self.layers is None:
            return default_window(n_layers, self.window_size)
        return parse_layers(self.layers, n_layers) if isinstance(self.layers, str) else list(self.layers)


@dataclass
class Calibration:
    """What `calibrate_cap` wrote: the cap config (at `path`) and calibration.json's content."""

    cap: CapConfig
    path: Path
    data: dict[str, Any]

    @property
    def tau(self) -> dict[int, float]:
        """τ per layer of the window."""
        return dict(zip(self.cap.layers, self.cap.tau, strict=True))


def calibrate_cap(
    model_name: str, axis: str | Path, run_dir: str | Path, config: CalibrationConfig, *, out: str | Path | None = None
) -> Calibration:
    """τ per layer from the pooled response-mean projections of a build's rollouts (`run_dir`) on the axis artifact
    at `axis` → a floor cap config over the window, saved at `out` (default RUN/artifacts/cap.safetensors), and
    RUN/calibration.json with τ at the chosen and the default percentiles. No model is loaded: `model_name` (as
    `model.loading.model_name` gives it) must be the one the axis and the build were made for."""
    run = Path(run_dir)
    vectors = Vectors.load(axis)
    if vectors.meta.model_id != model_name:
        raise PersonaxisError(f"{axis} was built for {vectors.meta.model_id}, not {model_name}")
    store = build_store(run, model_name)
    window = config.window(vectors.meta.n_layers)
    name = axis_name(vectors)
    projections = pooled_projections(store, vectors, name=name)
    q = config.percentile
    table = {p: calibrate(projections, vectors.layers, p) for p in sorted({*DEFAULT_PERCENTILES, q})}
    cap = cap_config(vectors, table[q], window, q, str(run), name=name)
    path = Path(out) if out is not None else run / ARTIFACTS_DIR / ARTIFACTS["cap"]
    cap.save(path)
    data = {
        "convention": CONVENTION,
        "n_rollouts": int(projections.shape[0]),
        "chosen_percentile": q,
        "window": window,
        "tau": {f"{p:g}": {str(i): t for i, t in tau.items()} for p, tau in table.items()},
    }
    write_json(run / CALIBRATION, data)
    return Calibration(cap, path, data)
