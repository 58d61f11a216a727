"""A Markdown report (with PNG plots beside it) for one trait run folder: what was extracted, from how much data,
what the filter dropped and why, how steering and monitoring came out. Each section appears only when its stage ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from personaxis.common.datasets import read_json
from personaxis.errors import PersonaxisError
from personaxis.traits import files
from personaxis.traits.extraction import REASONS
from personaxis.vectors import Vectors


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def _clip(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return (text if len(text) <= width else text[: width - 1] + "…").replace("|", "\\|")


def write_report(run: str | os.PathLike[str], *, plots: bool = True) -> Path:
    """Write report.md (and its plots) into the run folder; returns its path."""
    from personaxis.traits import plots as draw

    run = Path(run)
    if not (run / files.VECTORS).is_file() and not (run / files.SAMPLES).is_file():
        raise PersonaxisError(f"{run} is not a trait run folder (no {files.VECTORS} or {files.SAMPLES})")
    samples = files.read_jsonl(run / files.SAMPLES) if (run / files.SAMPLES).is_file() else []
    vectors = Vectors.load(run / files.VECTORS) if (run / files.VECTORS).is_file() else None
    meta = vectors.meta if vectors else None
    trait = meta.extra["trait"]["name"] if meta else run.name
    out: list[str] = [f"# Trait run: {trait}", ""]
    if meta:
        t = meta.extra["trait"]
        directions = ", ".join(f"`{n}` ({d})" for n, d in meta.extra["directions"].items())
        out += [
            f"> {t['description']}",
            "",
            f"- model: `{meta.model_id}` ({meta.n_layers} layers × {meta.hidden_size})",
            f"- judge: `{meta.extra.get('judge')}`",
            f"- trait file version: {t['version']}",
            f"- directions: {directions}",
            "",
        ]

    if samples:
        out += _extraction(samples, meta)
        if plots:
            draw.plot_scores(samples, trait, run / "scores.png")
            out += ["![scores](scores.png)", ""]
    if meta and plots and any(d is not None for d in meta.extra.get("separation", [])):
        draw.plot_separation(vectors.layers, meta.extra["separation"], run / "separation.png")
        out += ["Separation of the kept pairs along each layer's vector (in-sample: the vector was fit on them, so "
                "this is an upper bound on how well it separates new replies):", "", "![separation](separation.png)",
                ""]  # fmt: skip
    if (run / files.CALIBRATION).is_file():
        calibration = read_json(run / files.CALIBRATION)
        if plots:
            draw.plot_calibration(calibration, run / files.CALIBRATION_PLOT)
        out += _calibration(calibration)
    if (run / files.MONITOR).is_file():
        monitor = read_json(run / files.MONITOR)
        if plots:
            draw.plot_monitor(monitor, run / files.MONITOR_PLOT)
        out += _monitor(monitor)
    path = run / files.REPORT
    from personaxis.store import atomic_write_text

    atomic_write_text(path, "\n".join(out).rstrip() + "\n")
    return path


def _extraction(samples: list[dict[str, Any]], meta: Any) -> list[str]:
    pos = [s for s in samples if s["polarity"] == "pos"]
    neg = [s for s in samples if s["polarity"] == "neg"]

    def mean(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    out = ["## Extraction", "",
           f"{len(pos)} replies under eliciting and {len(neg)} under suppressing system prompts.", "",
           "| | trait (mean) | coherence (mean) | scored (trait) |", "|---|---|---|---|",
           f"| pos | {_num(mean(pos, 'trait'))} | {_num(mean(pos, 'coherence'))} | "
           f"{sum(s['trait'] is not None for s in pos)}/{len(pos)} |",
           f"| neg | {_num(mean(neg, 'trait'))} | {_num(mean(neg, 'coherence'))} | "
           f"{sum(s['trait'] is not None for s in neg)}/{len(neg)} |", ""]  # fmt: skip
    if meta:
        f = meta.extra["filter"]
        gap = f", pos − neg trait ≥ {f['min_gap']:g}" if f.get("min_gap") else ""
        out += [f"Filter: pos trait ≥ {f['pos_min']:g}, neg trait < {f['neg_max']:g}{gap}, both coherence ≥ "
                f"{f['coherence_min']:g}. **{f['kept']} of {f['pairs']} pairs kept**; a dropped pair counts under "
                "every reason it has:", "", "| reason | pairs |", "|---|---|"]  # fmt: skip
        out += [f"| {r.replace('_', ' ')} | {f.get(r, 0)} |" for r in REASONS]
        jc = meta.extra.get("judge_counts", {})
        out += ["", f"Judge calls: {jc.get('asked', 0)}, failed {jc.get('failed', 0)}, undefined (no numeric answer) "
                f"{jc.get('undefined', 0)}.", ""]  # fmt: skip
    kept = [s for s in pos if s["kept"]][:2] + [s for s in neg if s["kept"]][:2]
    if kept:
        out += [
            "Examples of kept replies:",
            "",
            "| side | question | reply | trait | coherence |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {s['polarity']} | {_clip(s['question_text'], 60)} | {_clip(s['text'])} | {_num(s['trait'])} | "
                f"{_num(s['coherence'])} |" for s in kept]  # fmt: skip
        out.append("")
    return out


def _calibration(c: dict[str, Any]) -> list[str]:
    s = c["settings"]
    out = ["## Steering calibration", "",
           f"{s['questions']} evaluation questions × {s['samples']} sample(s) per point, {s['max_new_tokens']} tokens, "
           f"temperature {s['temperature']:g}; strength in {s['units']} units; coherence threshold "
           f"{s['coherence_min']:g}" + (f", repetition limit {s['repetition_max']:g}" if "repetition_max" in s else "")
           + (f", per-question rise test at p < {s['alpha']:g}" if s.get("alpha", 1) < 1 else "") + ".", "",
           f"Unsteered baseline: trait {_num(c['baseline']['trait'])}, coherence {_num(c['baseline']['coherence'])}.",
           ""]  # fmt: skip
    choice = c.get("choice")
    if choice:
        out += [f"**Chosen: layer {choice['layer']}, c = {choice['coef']:g}** (trait {_num(choice['trait'])}, "
                f"coherence {_num(choice['coherence'])}, effect {_num(choice['effect'], '+.1f')}"
                + (f", p = {choice['p']:.2g}" if choice.get("p") is not None else "") + ").", ""]  # fmt: skip
    else:
        out += ["**No steered setting raised the trait score above the baseline within the coherence and repetition "
                "limits" + (", question by question" if s.get("alpha", 1) < 1 else "") + "**: no choice was stored.",
                ""]  # fmt: skip
    out += ["| layer | Spearman ρ (trait vs strength) | " + " | ".join(f"c={x:g}" for x in s["coefs"]) + " |",
            "|---|---|" + "---|" * len(s["coefs"])]  # fmt: skip
    by = {(cell["layer"], cell["coef"]): cell for cell in c["cells"]}
    for layer in c["layers"]:
        row = []
        for coef in s["coefs"]:
            cell = by.get((None, 0.0)) if coef == 0 else by.get((layer, coef))
            row.append(f"{_num(cell['trait'], '.0f')} / {_num(cell['coherence'], '.0f')}" if cell else "—")
        rho = c["spearman"].get(str(layer))
        out.append(f"| {layer} | {_num(rho, '+.2f')} | " + " | ".join(row) + " |")
    out += ["", "Cells are trait / coherence means.", ""]
    limit = s.get("repetition_max", 1.0)
    looping = [cell for cell in c["cells"] if (cell.get("repetition") or 0.0) > limit]
    if looping:
        cells = ", ".join(f"layer {x['layer']} c={x['coef']:g} ({x['repetition']:.2f})" for x in looping)
        out += [f"Not eligible, their replies loop (mean repetition above {limit:g}): {cells}.", ""]
    alpha, base = s.get("alpha", 1.0), c["baseline"]["trait"]
    luck = [x for x in c["cells"] if alpha < 1 and x.get("p") is not None and x["p"] >= alpha and x["coef"] > 0
            and None not in (x["trait"], base) and x["trait"] > base]  # fmt: skip
    if luck:
        cells = ", ".join(f"layer {x['layer']} c={x['coef']:g} (p = {x['p']:.2g})" for x in luck)
        out += [f"Above the baseline on average but not question by question (p ≥ {alpha:g}): {cells}.", ""]
    return out + [f"![calibration]({'calibration.png'})", ""]


def _monitor(m: dict[str, Any]) -> list[str]:
    s = m["settings"]
    out = ["## Monitoring", "",
           f"{m['n_points']} replies ({m['n_scored']} scored) to {s['questions']} evaluation questions under "
           f"{len({p['setting'] for p in m['points']})} prompt settings (graded system prompts from suppressing to "
           "eliciting, and few-shot variants).", ""]  # fmt: skip
    if m["layer"] is not None:
        out += [f"**Pearson r at layer {m['layer']} = {_num(m['r_layer'], '+.2f')}** over replies "
                f"(r over setting means {_num(m['r_setting_means'], '+.2f')}); best layer {m['best_layer']} "
                f"(r = {_num(m['r_best'], '+.2f')}, chosen after the fact).", "",
                f"![monitor]({'monitor.png'})", ""]  # fmt: skip
    else:
        out += ["r is undefined (too few scored replies, or no variation).", ""]
    return out
