"""PNG plots for axis builds, drift, capping sweeps and replays, drawn from the JSON the pipelines write.

Plots read only plain summaries (never the run store), so a report can redraw them anywhere. matplotlib is imported
lazily with the non-interactive Agg backend: the library works without it until a plot is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from personaxis.errors import PersonaxisError

DOMAIN_COLOURS = {"coding": "tab:blue", "writing": "tab:cyan", "therapy": "tab:red", "philosophy": "tab:orange"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PersonaxisError("plots need matplotlib: pip install 'matplotlib>=3.7'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


LABEL_ALL = 32
"""Up to this many roles every point is labelled; past it, only each PC's extremes (the rest would overlap)."""


def _labelled(xs: Sequence[float], ys: Sequence[float], per_end: int = 6) -> set[int]:
    if len(xs) <= LABEL_ALL:
        return set(range(len(xs)))
    chosen: set[int] = set()
    for values in (xs, ys):
        order = sorted(range(len(values)), key=values.__getitem__)
        chosen.update(order[:per_end] + order[-per_end:])
    return chosen


def pca_scatter(path: Path, summary: Mapping[str, Any]) -> Path:
    """Roles on PC1 × PC2 at the target layer, labelled, with the default Assistant marked."""
    plt = _pyplot()
    pcs = summary["pca"]
    coords = pcs["role_coordinates"]
    ratio = pcs["variance_ratio"]
    fig, ax = plt.subplots(figsize=(7, 5.5))
    xs = [c[0] for c in coords.values()]
    ys = [c[1] if len(c) > 1 else 0.0 for c in coords.values()]
    ax.scatter(xs, ys, s=18, color="tab:purple")
    labelled = _labelled(xs, ys)
    for i, (name, x, y) in enumerate(zip(coords, xs, ys, strict=True)):
        if i in labelled:
            ax.annotate(name.replace("_", " "), (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
    default = pcs.get("default_coordinates")
    if default:
        ax.scatter([default[0]], [default[1] if len(default) > 1 else 0.0], marker="*", s=160, color="black")
        ax.annotate(
            "default Assistant",
            (default[0], default[1] if len(default) > 1 else 0.0),
            fontsize=8,
            xytext=(4, -10),
            textcoords="offset points",
        )
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance; + toward the Assistant)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}%)" if len(ratio) > 1 else "PC2")
    title = f"Persona space of {summary['model']} at layer {pcs['layer']}"
    if len(labelled) < len(xs):
        title += f"\n{len(xs)} roles; the {len(labelled)} at the ends of PC1 and PC2 labelled"
    ax.set_title(title)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    return _save(fig, path)


def variance_curve(path: Path, summary: Mapping[str, Any]) -> Path:
    plt = _pyplot()
    ratio = summary["pca"]["variance_ratio"]
    cumulative = summary["pca"]["cumulative"]
    ks = list(range(1, len(ratio) + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(ks, ratio, color="tab:purple", alpha=0.6, label="per component")
    ax.plot(ks, cumulative, marker="o", color="black", label="cumulative")
    ax.axhline(0.7, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("principal component")
    ax.set_ylabel("share of variance")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Variance explained (layer {summary['pca']['layer']})")
    ax.legend()
    return _save(fig, path)


def cosine_by_layer(path: Path, summary: Mapping[str, Any]) -> Path:
    plt = _pyplot()
    cos = summary["axis"]["pc1_cosine_by_layer"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(cos)), cos, marker=".", color="tab:purple")
    ax.axvline(summary["target_layer"], color="grey", ls="--", lw=0.8, label="target layer")
    ax.axhline(0.7, color="grey", ls=":", lw=0.8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer (output of block i)")
    ax.set_ylabel("|cos(PC1, Assistant Axis)|")
    ax.set_title("PC1 of persona space against the axis, per layer")
    ax.legend()
    return _save(fig, path)


def role_count_stability(path: Path, result: Mapping[str, Any]) -> Path:
    """|cos(PC1, axis)| and PC1's variance share against the number of roles, mean with a 5–95% band."""
    plt = _pyplot()
    rows = result["rows"]
    n = [r["roles"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = (("cosine", "|cos(PC1, axis)|", "tab:purple"), ("pc1_variance", "PC1 share", "tab:green"))
    for name, label, color in series:
        ax.plot(n, [r[f"{name}_mean"] for r in rows], marker="o", color=color, label=label)
        ax.fill_between(n, [r[f"{name}_p5"] for r in rows], [r[f"{name}_p95"] for r in rows], color=color, alpha=0.2)
    ax.axhline(0.7, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("roles in the subset")
    ax.set_title(f"Persona space from random subsets of {result['roles_in_build']} roles (layer {result['layer']})")
    ax.legend()
    return _save(fig, path)


def role_agreement(path: Path, result: Mapping[str, Any]) -> Path:
    """The shared roles' PC1 coordinates in one build against the other, the ends labelled."""
    plt = _pyplot()
    values = result["pc1"]["values"]
    names = list(values)
    xs, ys = [values[n][0] for n in names], [values[n][1] for n in names]
    a, b = result["builds"]
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.scatter(xs, ys, s=14, color="tab:purple")
    for i in _labelled(xs, ys):
        ax.annotate(names[i], (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"PC1, {a['model']} (layer {a['layer']})")
    ax.set_ylabel(f"PC1, {b['model']} (layer {b['layer']})")
    ax.set_title(f"{len(names)} shared roles: Pearson r = {result['pc1']['pearson_r']:.2f}")
    return _save(fig, path)


def build_plot_paths(folder: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    """Where `build_plots` draws a build's plots, by name, without drawing them."""
    folder = Path(folder)
    out = {"plot_cosine_by_layer": folder / "cosine_by_layer.png"}
    if len(summary["pca"]["variance_ratio"]) >= 1:
        out["plot_pca"] = folder / "pca_scatter.png"
        out["plot_variance"] = folder / "variance.png"
    return out


_BUILD_PLOTS = {"plot_cosine_by_layer": cosine_by_layer, "plot_pca": pca_scatter, "plot_variance": variance_curve}


def build_plots(folder: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    """Draw a build's plots from its summary; returns their paths by name."""
    return {name: _BUILD_PLOTS[name](path, summary) for name, path in build_plot_paths(folder, summary).items()}


def drift_trajectories(path: Path, conversations: Sequence[Mapping[str, Any]], layer: int) -> Path:
    """Projection on the axis per assistant turn: one thin line per conversation, the domain mean in bold."""
    plt = _pyplot()
    domains = sorted(
        {c["domain"] for c in conversations}, key=lambda d: list(DOMAIN_COLOURS).index(d) if d in DOMAIN_COLOURS else 99
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for domain in domains:
        colour = DOMAIN_COLOURS.get(domain, "grey")
        rows = [c["projections"] for c in conversations if c["domain"] == domain]
        for row in rows:
            ax.plot(range(1, len(row) + 1), row, color=colour, alpha=0.25, lw=0.8)
        longest = max(len(r) for r in rows)
        means = []
        for t in range(longest):
            values = [r[t] for r in rows if t < len(r) and r[t] is not None]
            means.append(sum(values) / len(values) if values else float("nan"))
        ax.plot(range(1, longest + 1), means, color=colour, lw=2.2, label=domain)
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(f"projection on the Assistant Axis (layer {layer})")
    ax.set_title("Drift along the Assistant Axis by domain (higher = more Assistant-like)")
    ax.legend()
    return _save(fig, path)


def sweep_front(path: Path, rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any], chosen: str | None) -> Path:
    """Harm rate against capability for every (window, percentile), the Pareto front joined, the choice starred."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    rows = [r for r in rows if r["harm_rate"] is not None and r["capability"] is not None]
    sizes = sorted({len(r["layers"]) for r in rows})
    markers = dict(zip(sizes, "os^Dv", strict=False))
    for size in sizes:
        group = [r for r in rows if len(r["layers"]) == size]
        ax.scatter(
            [r["harm_rate"] for r in group],
            [r["capability"] for r in group],
            marker=markers[size],
            alpha=0.7,
            label=f"{size}-layer windows",
        )
    front = sorted((r for r in [*rows, baseline] if r.get("pareto")), key=lambda r: r["harm_rate"])
    ax.plot(
        [r["harm_rate"] for r in front], [r["capability"] for r in front], color="black", lw=1, label="Pareto front"
    )
    if baseline["harm_rate"] is not None and baseline["capability"] is not None:
        ax.scatter(
            [baseline["harm_rate"]], [baseline["capability"]], marker="X", s=120, color="tab:red", label="no cap"
        )
    for r in rows:
        if r["id"] == chosen:
            ax.scatter(
                [r["harm_rate"]],
                [r["capability"]],
                marker="*",
                s=260,
                facecolor="none",
                edgecolor="black",
                label="chosen",
            )
    ax.set_xlabel("harmful reply rate on persona jailbreaks (lower is better)")
    ax.set_ylabel("capability accuracy (higher is better)")
    ax.set_title("Activation capping: layer windows × τ percentiles")
    ax.legend(fontsize=8)
    return _save(fig, path)


def separation_by_layer(path: Path, profile: Mapping[str, Any], target_layer: int) -> Path:
    """Per layer, the AUROC that a harmful uncapped reply projects below a reply of each comparison group."""
    from personaxis.axis.outcomes import OUTCOME_NAMES

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = sorted(profile, key=int)
    for name in ("judged", "other", "capability"):
        points = [(int(k), profile[k]["harmful_below"][name]) for k in layers]
        points = [(layer, tested["auroc"]) for layer, tested in points if tested]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=f"harmful below {OUTCOME_NAMES.get(name, name)}")
    ax.axhline(0.5, color="grey", ls=":", lw=0.8)
    ax.axvline(target_layer, color="grey", ls="--", lw=0.8, label="target layer")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer (output of block i)")
    ax.set_ylabel("AUROC (0.5: no separation)")
    ax.set_title("Does a low projection on the axis mark the harmful replies? (no cap)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def replay_plot(path: Path, chats: Sequence[Mapping[str, Any]], layer: int) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, chat in enumerate(chats):
        turns = range(1, len(chat["uncapped"]) + 1)
        ax.plot(turns, chat["uncapped"], color="tab:red", alpha=0.8, marker="o", label="uncapped" if i == 0 else None)
        ax.plot(turns, chat["capped"], color="tab:green", alpha=0.8, marker="s", label="capped" if i == 0 else None)
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(f"projection on the Assistant Axis (layer {layer})")
    ax.set_title("The same user turns, replies regenerated with and without capping")
    ax.legend()
    return _save(fig, path)
