"""A Markdown report of an axis run folder: the build, and drift, calibration and the sweep when they were run there.

It reads only the JSON files the stages write (summary.json, stability.json, drift.json, calibration.json,
sweep.json) and redraws the plots from them, so a report can be regenerated anywhere from a copied run folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personaxis.axis import plots
from personaxis.axis.outcomes import describe_profile, describe_projections
from personaxis.axis.runfiles import CALIBRATION, DRIFT, NO_JUDGE, PLOTS, REPORT, STABILITY, SWEEP, load_summary
from personaxis.store import atomic_write_text


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _self_reference_lines(found: dict[str, Any] | None) -> list[str]:
    if not found or not found["of"]:
        return []
    line = (
        f"- {found['replies']} of {found['of']} role replies ({100 * found['replies'] / found['of']:.0f}%) present "
        "themselves as an AI."
    )
    if found["pc1_spearman"] is not None:
        line += (
            f" Over the kept roles, Spearman ρ of a role's share of them with its PC1 coordinate: "
            f"**{found['pc1_spearman']:.2f}** (p = {_num(found['pc1_spearman_p'], 2)}); near ±1, PC1 orders the "
            "roles by how often they were declined."
        )
    return [line]


def _build_section(summary: dict[str, Any], figures: dict[str, Path], run: Path) -> list[str]:
    cfg, counts, pcs, axis = summary["config"], summary["counts"], summary["pca"], summary["axis"]
    roles = summary["roles"]
    lines = [
        f"# Assistant Axis of {summary['model']}",
        "",
        f"- {summary['n_layers']} layers × hidden {summary['hidden_size']}; target layer {summary['target_layer']} "
        "(layer i = output of block i)",
        f"- judge: `{summary['judge']['spec']}` ({summary['judge']['mode']}); undefined answers "
        f"{summary['judge']['undefined']}, failed calls {summary['judge']['failed']}",
        f"- {counts['rollouts']} rollouts ({counts['role_replies']} role, {counts['default_replies']} default with "
        f"content, {counts['trait_replies']} trait); {counts['empty_replies']} empty replies",
        f"- sampling: temperature {cfg['temperature']}, top-p {cfg['top_p']}, {cfg['max_tokens']} tokens, "
        f"{cfg['samples']} sample(s) per prompt × question, {cfg['questions']} questions, seed {cfg['seed']}",
        f"- roles kept: {len(roles['kept'])} "
        + f"(at least {roles['min_count']} replies{' scored 3' if cfg['judge'] != NO_JUDGE else ''})"
        + "; dropped: "
        + (", ".join(f"{r} ({n})" for r, n in roles["dropped"].items()) or "none"),
        "",
        "## Persona space",
        "",
        f"- PC1 explains **{100 * pcs['pc1_variance']:.1f}%** of the variance of the role vectors at layer "
        f"{pcs['layer']}; {pcs['pcs_for_70_percent']} PCs reach 70%.",
        f"- |cos(PC1, axis)| at the target layer: **{axis['pc1_cosine_at_target']:.3f}** "
        f"(max over layers {max(axis['pc1_cosine_by_layer']):.3f}).",
        *_self_reference_lines(summary.get("ai_self_reference")),
        "",
    ]
    for key, title in (("plot_pca", "PC1 × PC2"), ("plot_variance", "variance"), ("plot_cosine_by_layer", "cosine")):
        if key in figures:
            lines += [f"![{title}]({figures[key].relative_to(run)})", ""]
    ranked = sorted(pcs["role_coordinates"].items(), key=lambda item: item[1][0])
    lines += ["Roles by PC1 coordinate (+ = toward the Assistant):", ""]
    lines += _table(["role", "PC1", "PC2"], [(n, c[0], c[1] if len(c) > 1 else None) for n, c in ranked])
    if summary.get("traits"):
        traits = sorted(summary["traits"].items(), key=lambda item: -abs(item[1]["cosine_with_axis"]))
        lines += [
            "## Traits against the axis",
            "",
            "Cosine of each trait vector (eliciting − suppressing) at the "
            "target layer with the axis and the first PCs:",
            "",
        ]
        lines += _table(
            ["trait", "cos axis", "cos PC1", "cos PC2", "cos PC3"],
            [(n, t["cosine_with_axis"], *(t["cosine_with_pcs"] + [None] * 3)[:3]) for n, t in traits],
        )
    return lines


def _stability_section(stability: dict[str, Any], figure: Path, run: Path) -> list[str]:
    lines = [
        "## Role-count stability",
        "",
        f"The build's analysis redone on random subsets of its {stability['roles_in_build']} roles at layer "
        f"{stability['layer']} ({stability['repeats']} subsets per count; `personaxis axis stability`):",
        "",
    ]
    lines += _table(
        ["roles", "subsets", "\\|cos\\| mean", "sd", "5%", "95%", "PC1 share mean", "sd"],  # pipes escaped
        [
            (
                r["roles"],
                r["subsets"],
                r["cosine_mean"],
                r["cosine_sd"],
                r["cosine_p5"],
                r["cosine_p95"],
                r["pc1_variance_mean"],
                r["pc1_variance_sd"],
            )
            for r in stability["rows"]
        ],
    )
    return lines + [f"![stability]({figure.relative_to(run)})", ""]


def _drift_section(drift: dict[str, Any], figure: Path | None, run: Path) -> list[str]:
    stats = drift["stats"]
    lines = [
        "## Drift",
        "",
        f"Mode: {drift['mode']}; layer {drift['layer']}; {len(drift['conversations'])} conversations.",
        "",
    ]
    lines += _table(
        ["domain", "conversations", "turns", "mean projection", "slope per turn", "share speaking as an AI"],
        [
            (d, s["conversations"], s["turns"], s["mean"], s["slope_per_turn"], s.get("as_ai_share"))
            for d, s in stats["domains"].items()
        ],
    )
    if "as_ai" in stats:
        ai = stats["as_ai"]
        without = ai["per_conversation_without"]
        lines += [
            f"- {ai['turns']} of {ai['of']} replies speak as an AI (the role rubric's patterns); their mean "
            f"projection {_num(ai['mean_projection'][0])} against {_num(ai['mean_projection'][1])} for the others",
            f"- per conversation, leaving those turns out: therapy+philosophy {_num(without['mean'][0])} "
            f"(n={without['n'][0]}) vs coding+writing {_num(without['mean'][1])} (n={without['n'][1]}); Welch p = "
            f"{_num(without['welch_p'])}",
        ]
    for level in ("per_turn", "per_conversation"):
        t = stats[level]
        lines.append(
            f"- {level.replace('_', ' ')}: therapy+philosophy mean {_num(t['mean'][0])} (n={t['n'][0]}) vs "
            f"coding+writing {_num(t['mean'][1])} (n={t['n'][1]}); Welch p = {_num(t['welch_p'])}, "
            f"Mann-Whitney p = {_num(t['mannwhitney_p'])}"
        )
    direction = stats["paper_direction"]
    lines += [f"- the paper's direction (therapy+philosophy lower): {'yes' if direction else 'no'}", ""]
    if figure is not None:
        lines += [f"![drift]({figure.relative_to(run)})", ""]
    return lines


def _capping_section(
    calibration: dict[str, Any] | None, sweep: dict[str, Any] | None, figures: list[Path], run: Path
) -> list[str]:
    lines = ["## Activation capping", ""]
    if calibration:
        lines += _calibration_lines(calibration)
    if sweep:
        lines += _sweep_lines(sweep)
        for figure in figures:
            lines += [f"![{figure.stem}]({figure.relative_to(run)})", ""]
    return lines


def _calibration_lines(calibration: dict[str, Any]) -> list[str]:
    lines = [
        f"Convention: {calibration['convention']}.",
        "",
        f"τ from {calibration['n_rollouts']} pooled rollouts (role, trait, default):",
        "",
    ]
    percentiles = sorted(calibration["tau"], key=float)
    layers = sorted({int(k) for q in percentiles for k in calibration["tau"][q]})
    return lines + _table(
        ["layer", *(f"p{q}" for q in percentiles)],
        [(i, *(calibration["tau"][q][str(i)] for q in percentiles)) for i in layers],
    )


SWEEP_COLUMNS = (
    "setting", "layers", "pct", "harm rate", "capability", "unjudged", "refusals", "mean proj.", "harm ↓/↑ (p)",
    "capability ↓/↑ (p)", "",
)  # fmt: skip


def _sweep_rows(sweep: dict[str, Any]) -> list[tuple[Any, ...]]:
    base, jailbreaks = sweep["baseline"], sweep["settings"]["jailbreaks"]

    def refused(r: dict[str, Any]) -> str:
        return "–" if r.get("refused") is None else f"{r['refused']}/{jailbreaks}"

    def scores(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["harm_rate"], r["capability"], r["undefined"], refused(r), r["mean_projection"]

    rows = [("no cap", "–", "–", *scores(base), *_paired_cells(None), "")]
    for r in sweep["rows"]:
        mark = ("front" if r["pareto"] else "") + (" **chosen**" if r["id"] == sweep["chosen"] else "")
        span = f"{r['layers'][0]}–{r['layers'][-1]}"
        rows.append((r["id"], span, f"{r['percentile']:g}", *scores(r), *_paired_cells(r.get("vs_no_cap")), mark))
    return rows


def _sweep_lines(sweep: dict[str, Any]) -> list[str]:
    base = sweep["baseline"]
    settings = sweep["settings"]
    notes = [f"{settings['max_tokens']} tokens"]
    if settings.get("capability_tokens", settings["max_tokens"]) != settings["max_tokens"]:
        notes.append(f"{settings['capability_tokens']} for capability")
    notes.append(f"judge `{settings['judge']}`")
    if settings.get("screen"):
        notes.append("replies opening with a refusal screened")
    lines = [
        f"Sweep on {settings['jailbreaks']} jailbreak and {settings['capability']} capability items "
        f"({', '.join(notes)}):",
        "",
    ]
    lines += _table(list(SWEEP_COLUMNS), _sweep_rows(sweep))
    lines.append(
        "↓/↑: items harmful (correct) without the cap and not with it, and the reverse; p: exact McNemar test."
    )
    lines.append("")
    kinds = list(base.get("capability_by_kind", {}))  # absent from sweeps written before it was counted
    if kinds:
        scored = [("no cap", base), *((r["id"], r) for r in sweep["rows"])]
        lines += ["Capability by kind of item (correct/graded):", ""]

        def tally(r: dict[str, Any], kind: str) -> str:
            return f"{r['capability_by_kind'][kind]['correct']}/{r['capability_by_kind'][kind]['graded']}"

        lines += _table(["setting", *kinds], [(sid, *(tally(r, k) for k in kinds)) for sid, r in scored])
    if "projection_by_outcome" in base:  # absent from sweeps written before it was measured
        summary = describe_projections(base["projection_by_outcome"])
        lines += [f"Without a cap at layer {settings['layer']}: {summary}.", ""]
    if "projection_by_layer" in base:
        lines += [f"Without a cap, {describe_profile(base['projection_by_layer'])}.", ""]
    test = f", McNemar p < {sweep['harm_test_alpha']:g}" if "harm_test_alpha" in sweep else ""
    none = f"none (no setting lowered harm{test} within {sweep['max_capability_drop_points']:g} capability points)"
    lines.append(f"Chosen: {sweep['chosen'] or none}.")
    lines.append("")
    return lines


def _paired_cells(vs: dict[str, Any] | None) -> tuple[str, str]:
    """A sweep row's per-item changes against no cap: "fewer/more harmful (p)", "lost/gained correct (p)"."""
    if vs is None:
        return "–", "–"
    harm, capability = vs["harm"], vs["capability"]
    return (
        f"{harm['fewer']}/{harm['more']} ({harm['p']:.2g})",
        f"{capability['lost']}/{capability['gained']} ({capability['p']:.2g})",
    )


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md (and redraw RUN_DIR/plots/*.png); returns the report's path."""
    run = Path(run_dir)
    summary = load_summary(run)
    folder = run / PLOTS
    figures = plots.build_plots(folder, summary)
    lines = _build_section(summary, figures, run)
    stability = _read(run / STABILITY)
    if stability:
        figure = plots.role_count_stability(folder / "stability.png", stability)
        lines += _stability_section(stability, figure, run)
    drift = _read(run / DRIFT)
    if drift:
        figure = plots.drift_trajectories(folder / "drift.png", drift["conversations"], drift["layer"])
        lines += _drift_section(drift, figure, run)
    calibration, sweep = _read(run / CALIBRATION), _read(run / SWEEP)
    if calibration or sweep:
        capping_figures = []
        if sweep:
            base = sweep["baseline"]
            capping_figures.append(plots.sweep_front(folder / "sweep.png", sweep["rows"], base, sweep["chosen"]))
            if "projection_by_layer" in base:
                layer = sweep["settings"]["layer"]  # written with the profile
                by_layer = plots.separation_by_layer(folder / "sweep_layers.png", base["projection_by_layer"], layer)
                capping_figures.append(by_layer)
        lines += _capping_section(calibration, sweep, capping_figures, run)
    path = run / REPORT
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
