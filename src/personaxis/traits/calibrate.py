"""Choosing where and how hard to steer with a trait vector (science.md §1, step 6).

The sweep steers the reply to each held-out evaluation question (no system prompt, so only the vector pushes) with
c · mean_norm_i · v̂_i at one layer i at a time, for every strength c in a grid that includes 0 (the unsteered
baseline, shared by all layers) and negative values (suppression). The judge scores each reply for the trait and for
coherence. The choice is the (layer, c > 0) cell with the highest mean trait score among the cells whose mean
coherence stays at or above `coherence_min` and that beat the baseline question by question: the largest trait
effect that still reads as language (none, if no such cell raises the score). "Question by question" is a one-sided
sign-flip test of the cell's scores against the unsteered replies to the same questions (p < `alpha`): picking the
best of some forty cells of five replies each otherwise picks a cell whose lead over the baseline is one lucky reply.
With the default 5 questions the test passes only when every question's score rose; more questions test finer.
The strength is in relative units, so it transfers between layers whose residual norms differ by an order of
magnitude.

Small local judges score a reply stuck in a loop ("to do, to do, to do, ...") as fairly coherent, and over-steered
replies loop long before they stop being words. So each reply also gets a judge-free `repetition` (the share of its
10-character windows seen earlier in it: a median of 0.02 for ordinary replies, 0.5-0.9 for a loop), and a cell whose
mean repetition exceeds `repetition_max` is never chosen.

Replies are greedy by default: with a handful of questions per cell, sampling noise would swamp the dose-response
curve that the choice is read from.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from personaxis.backends.runs import LocalBackend, OpsBackend, Rollout, run_rollouts
from personaxis.common.progress import progress_bar
from personaxis.common.stats import check_alpha, rise_p, spearman
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling
from personaxis.inference.steering import STEER_WHEN, steer_op
from personaxis.judge import Judge
from personaxis.model.loading import ChatModel
from personaxis.store import RunStore
from personaxis.traits.extraction import sample_seed
from personaxis.traits.judging import judge_replies
from personaxis.traits.library import TraitSpec
from personaxis.traits.steer import primary
from personaxis.vectors import Vectors

STAGE = "trait_calibration"
# Log-spaced: the strength that changes behaviour differs between models by several times (SmolLM2-135M breaks down
# at 0.4 while Qwen2.5-Coder-1.5B is hardly moved by it and turns evil at 0.8: their residual norms are ~170 and ~40
# against trait vectors of similar length), so the grid spans 0.1-0.8 with as many points as a linear 0.1-0.4 grid had.
DEFAULT_COEFS = (-0.4, -0.2, -0.1, 0.0, 0.1, 0.2, 0.4, 0.8)


@dataclass(frozen=True)
class CalibrateSettings:
    coefs: tuple[float, ...] = DEFAULT_COEFS  # relative units: c · mean_norm · v̂
    questions: int | None = 5  # the first N evaluation questions (None: all)
    samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8
    coherence_min: float = 50.0
    repetition_max: float = 0.5  # 1.0: no limit
    alpha: float = 0.05  # the choice's per-question rise must have p below this (1.0: no test)
    units: str = "relative"

    def __post_init__(self) -> None:
        if not self.coefs or any(not math.isfinite(c) for c in self.coefs):
            raise PersonaxisError("give at least one finite steering coefficient")
        if self.samples < 1 or self.batch_size < 1 or (self.questions is not None and self.questions < 1):
            raise PersonaxisError("questions, samples and batch size must be at least 1")
        if not 0.0 <= self.repetition_max <= 1.0:
            raise PersonaxisError(f"the repetition limit must lie in 0-1, got {self.repetition_max:g}")
        check_alpha(self.alpha)


@dataclass
class Cell:
    """One point of the sweep: mean scores over its replies (None when no reply got a defined score)."""

    layer: int | None  # None for the unsteered baseline (coef 0)
    coef: float
    trait: float | None
    coherence: float | None
    n: int
    n_trait: int  # replies with a defined trait score
    n_coherence: int
    repetition: float | None = None  # mean share of repeated 10-character windows (None in older calibrations)
    p: float | None = None  # one-sided p that the trait rose over the baseline question by question (None: baseline)


def default_layers(n_layers: int, count: int = 5) -> list[int]:
    """`count` layers spread over the middle half of the network, where steering usually works best."""
    lo, hi = n_layers // 4, max(n_layers // 4, (3 * n_layers) // 4)
    if hi - lo + 1 <= count:
        return list(range(lo, hi + 1))
    return sorted({round(lo + k * (hi - lo) / (count - 1)) for k in range(count)})


def repetition(text: str, width: int = 10) -> float:
    """The share of the text's `width`-character windows that repeat an earlier window: 0 for text that never
    repeats itself, near 1 for a loop. Text shorter than one window counts as not repetitive."""
    windows = [text[i : i + width] for i in range(len(text) - width + 1)]
    return 1.0 - len(set(windows)) / len(windows) if windows else 0.0


def choose(
    cells: Sequence[Cell], coherence_min: float, repetition_max: float = 1.0, alpha: float = 0.05
) -> Cell | None:
    """The steered cell (c > 0) with the highest mean trait score whose mean coherence is ≥ `coherence_min` and
    whose mean repetition is ≤ `repetition_max`, provided it scores above the unsteered baseline, question by
    question beyond chance (p < `alpha`; 1 waives the test): a setting that does not raise the trait is no choice.

    Ties go to the smaller strength (less damage for the same effect), then to the earlier layer.
    """
    baseline = next((c.trait for c in cells if c.layer is None and c.trait is not None), -math.inf)
    eligible = [
        c for c in cells
        if c.layer is not None and c.coef > 0 and c.trait is not None and c.trait > baseline
        and c.coherence is not None and c.coherence >= coherence_min
        and (c.repetition is None or c.repetition <= repetition_max)
        and (alpha >= 1 or (c.p is not None and c.p < alpha))
    ]  # fmt: skip
    if not eligible:
        return None
    return min(eligible, key=lambda c: (-c.trait, c.coef, c.layer))


def curve(cells: Sequence[Cell], layer: int) -> list[Cell]:
    """The dose-response curve at one layer: its cells plus the shared baseline, by strength."""
    return sorted([c for c in cells if c.layer == layer or (c.layer is None and c.coef == 0)], key=lambda c: c.coef)


def layer_spearman(cells: Sequence[Cell], layer: int) -> float | None:
    points = [(c.coef, c.trait) for c in curve(cells, layer) if c.trait is not None]
    return spearman([x for x, _ in points], [y for _, y in points]) if len(points) >= 2 else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fingerprint(vectors: Vectors, name: str, layer: int) -> str:
    return hashlib.sha256(vectors.direction(layer, name).numpy().tobytes()).hexdigest()[:16]


def calibrate(
    model: ChatModel,
    trait: TraitSpec,
    vectors: Vectors,
    judge: Judge,
    store: RunStore,
    layers: Sequence[int] | None = None,
    settings: CalibrateSettings = CalibrateSettings(),
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the sweep and return the calibration (grid, per-layer Spearman ρ, choice); see the module docstring."""
    vectors.validate(model)
    name = primary(vectors)
    layers = default_layers(model.n_layers) if layers is None else sorted(set(layers))
    layers = [layer for layer in layers if layer in vectors.layers] or vectors.layers[:1]
    coefs = sorted(set(settings.coefs) | {0.0})
    questions = trait.questions.evaluation[: settings.questions or None]
    groups = [(None, 0.0)] + [(layer, c) for layer in layers for c in coefs if c != 0]
    rows = _steered_replies(model, vectors, name, store, questions, groups, settings, progress)
    judged, counts = judge_replies(
        judge, trait.rubric, [(r["question_text"], r["text"]) for r in rows], progress=progress,
        description="judging steered replies",
    )  # fmt: skip
    for row, j in zip(rows, judged, strict=True):
        row.update(j.as_dict())
    cells = _cells(rows, groups)
    best = choose(cells, settings.coherence_min, settings.repetition_max, settings.alpha)
    baseline = cells[0]
    choice = None
    if best is not None:
        choice = {
            "layer": best.layer, "coef": best.coef, "units": settings.units, "trait": best.trait,
            "coherence": best.coherence, "repetition": best.repetition, "p": best.p,
            "effect": None if baseline.trait is None else best.trait - baseline.trait,
        }  # fmt: skip
    return {
        "trait": trait.name,
        "direction": name,
        "judge": judge.judge_id,
        "judge_counts": counts.as_dict(),
        "settings": {**asdict(settings), "coefs": coefs, "questions": len(questions)},
        "layers": layers,
        "baseline": asdict(baseline),
        "cells": [asdict(c) for c in cells],
        "spearman": {str(layer): layer_spearman(cells, layer) for layer in layers},
        "choice": choice,
        "samples": rows,
    }


def _steered_replies(
    model: ChatModel,
    vectors: Vectors,
    name: str,
    store: RunStore,
    questions: Sequence[str],
    groups: Sequence[tuple[int | None, float]],
    settings: CalibrateSettings,
    progress: bool,
) -> list[dict[str, Any]]:
    """Every question's replies, unsteered (layer None) and under each (layer, coef) of the grid, through the store."""
    rows: list[dict[str, Any]] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("steering sweep", total=len(groups))
        for layer, coef in groups:
            rollouts = [
                Rollout.make(
                    f"q{q}/s{s}", [{"role": "user", "content": question}],
                    Sampling(settings.max_new_tokens, settings.temperature, seed=sample_seed(settings.seed, q, s)),
                )
                for q, question in enumerate(questions) for s in range(settings.samples)
            ]  # fmt: skip
            if layer is None:
                backend = LocalBackend(model, [], batch_size=settings.batch_size)
            else:
                op = steer_op(vectors, coef, layer, name=name, units=settings.units, when=STEER_WHEN)  # type: ignore[arg-type]
                steer = {"direction": _fingerprint(vectors, name, layer), "layer": layer, "coef": coef,
                         "units": settings.units, "when": STEER_WHEN}  # fmt: skip
                backend = OpsBackend(model, [op], {"steer": steer}, batch_size=settings.batch_size)
            records = run_rollouts(store, rollouts, backend, stage=STAGE, progress=False)
            for r in rollouts:
                q, s = (int(part[1:]) for part in r.id.split("/"))  # "q{q}/s{s}"
                text = records[r.id].data["text"]
                rows.append({"layer": layer, "coef": coef, "question": q, "sample": s, "question_text": questions[q],
                             "text": text, "repetition": repetition(text)})  # fmt: skip
            bar.advance(task)
    return rows


def _cells(rows: list[dict[str, Any]], groups: Sequence[tuple[int | None, float]]) -> list[Cell]:
    """One cell per (layer, coef): mean trait and coherence scores, and the p-value that steering raised the trait
    pair by pair against the unsteered replies to the same questions and seeds."""
    unsteered = {(r["question"], r["sample"]): r["trait"] for r in rows if r["layer"] is None}
    cells = []
    for layer, coef in groups:
        mine = [r for r in rows if r["layer"] == layer and r["coef"] == coef]
        traits = [r["trait"] for r in mine if r["trait"] is not None]
        coherences = [r["coherence"] for r in mine if r["coherence"] is not None]
        pairs = [(r["trait"], unsteered[r["question"], r["sample"]]) for r in mine]
        pairs = [(t, u) for t, u in pairs if t is not None and u is not None]
        p = None if layer is None else rise_p([t for t, _ in pairs], [u for _, u in pairs])
        cells.append(Cell(layer, coef, _mean(traits), _mean(coherences), len(mine), len(traits), len(coherences),
                          _mean([r["repetition"] for r in mine]), p))  # fmt: skip
    return cells


def summary(calibration: dict[str, Any]) -> dict[str, Any]:
    """What goes into the artifact's metadata: everything but the replies."""
    return {k: v for k, v in calibration.items() if k != "samples"}


def cells_of(calibration: dict[str, Any]) -> list[Cell]:
    return [Cell(**c) for c in calibration["cells"]]
