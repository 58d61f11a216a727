"""The trait figures as PNG files (matplotlib, drawn off-screen)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personaxis.errors import PersonaxisError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PersonaxisError("plots need matplotlib: pip install 'matplotlib>=3.8'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    import io

    from personaxis.store import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    fig.clf()
    _pyplot().close(fig)
    return Path(path)


def plot_calibration(calibration: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Trait score (left) and coherence (right) against steering strength, one line per layer; the choice starred."""
    from personaxis.traits.calibrate import cells_of, curve

    plt = _pyplot()
    cells = cells_of(calibration)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("viridis")
    layers = calibration["layers"]
    for k, layer in enumerate(layers):
        points = curve(cells, layer)
        color = colors(k / max(1, len(layers) - 1))
        rho = calibration["spearman"].get(str(layer))
        label = f"layer {layer}" + (f" (ρ {rho:+.2f})" if rho is not None else "")
        for ax, attr in ((left, "trait"), (right, "coherence")):
            xs = [c.coef for c in points if getattr(c, attr) is not None]
            ys = [getattr(c, attr) for c in points if getattr(c, attr) is not None]
            ax.plot(xs, ys, marker="o", color=color, label=label)
    choice = calibration.get("choice")
    if choice:
        left.plot([choice["coef"]], [choice["trait"]], marker="*", markersize=18, color="crimson", linestyle="none",
                  label=f"chosen: layer {choice['layer']}, c = {choice['coef']:g}")  # fmt: skip
    threshold = calibration["settings"]["coherence_min"]
    right.axhline(threshold, color="grey", linestyle="--", linewidth=1)
    units = calibration["settings"]["units"]
    for ax, what in ((left, f"{calibration['trait']} score (judge, 0-100)"), (right, "coherence (judge, 0-100)")):
        ax.set_xlabel(f"steering strength c ({units} units: c · mean norm · v̂)" if units == "relative" else "α")
        ax.set_ylabel(what)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    settings = calibration["settings"]
    n = settings["questions"] * settings["samples"]
    fig.suptitle(
        f"Steering with the {calibration['trait']} vector ({n} replies per point, judge {calibration['judge']})"
    )
    return _save(fig, path)


def plot_monitor(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Last-prompt projection against the judged trait score of the reply, colored by how eliciting the prompt was."""
    plt = _pyplot()
    layer = result["layer"]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    if layer is not None:
        k = result["layers"].index(layer)
        colors = plt.get_cmap("coolwarm")
        groups: dict[str, list[dict[str, Any]]] = {}
        for p in result["points"]:
            if p["trait"] is not None:
                groups.setdefault(p["setting"], []).append(p)
        for setting, points in groups.items():
            few = setting.startswith("fewshot")
            grade = int(setting[-1]) / (3 if few else 7)
            ax.scatter([p["projection"][k] for p in points], [p["trait"] for p in points], color=colors(grade),
                       marker="^" if few else "o", edgecolor="black", linewidth=0.4, s=36,
                       label=setting.split("/")[-1])  # fmt: skip
        r = result["r_layer"]
        ax.set_title(f"{result['trait']}: layer {layer}, Pearson r = {r:+.2f}" if r is not None else "r undefined")
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("projection of the last prompt token on v̂")
    ax.set_ylabel(f"{result['trait']} score of the reply (judge)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_scores(samples: Sequence[dict[str, Any]], trait: str, path: str | os.PathLike[str]) -> Path:
    """Judged trait and coherence scores of the extraction replies, by polarity."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = [i * 10 for i in range(11)]
    for ax, score in zip(axes, ("trait", "coherence"), strict=True):
        for polarity, color in (("pos", "crimson"), ("neg", "steelblue")):
            values = [s[score] for s in samples if s["polarity"] == polarity and s.get(score) is not None]
            ax.hist(values, bins=bins, alpha=0.6, color=color, label=f"{polarity} ({len(values)} scored)")
        ax.set_xlabel(f"{trait if score == 'trait' else 'coherence'} score")
        ax.set_ylabel("replies")
        ax.legend(fontsize=8)
    fig.suptitle("Extraction replies under eliciting (pos) and suppressing (neg) system prompts")
    return _save(fig, path)


def plot_separation(layers: Sequence[int], separation: Sequence[float | None], path: str | os.PathLike[str]) -> Path:
    """Cohen's d between kept pos and neg replies projected on each layer's vector."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    points = [(layer, d) for layer, d in zip(layers, separation, strict=True) if d is not None]
    ax.plot([x for x, _ in points], [y for _, y in points], marker="o")
    ax.set_xlabel("layer (output of block i)")
    ax.set_ylabel("separation (Cohen's d)")
    ax.grid(alpha=0.3)
    return _save(fig, path)
