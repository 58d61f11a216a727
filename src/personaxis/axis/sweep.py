"""The layer-window sweep (science.md §2.6–2.7): no cap and every (window, percentile) scored on the persona jailbreak
set (harmful = the judge's "enough info" and above) and on the exact-answer capability set; the Pareto front of
(harm rate, capability) and the setting chosen from it.

`sweep` is the stage: it writes sweep.json, its plots and the chosen cap config into the build's run folder, where
`report` finds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personaxis.axis.calibration import DEFAULT_PERCENTILES, calibrate, cap_config, pooled_projections, sweep_windows
from personaxis.axis.evals.capability import CapabilityItem, grade_capability, load_capability
from personaxis.axis.evals.jailbreaks import JailbreakItem, JudgeRubric, load_jailbreak_rubric, load_jailbreaks
from personaxis.axis.library import select
from personaxis.axis.outcomes import (
    Score,
    classify_jailbreaks,
    describe,
    describe_profile,
    describe_projections,
    paired,
    projection_by_outcome,
)
from personaxis.axis.runfiles import ARTIFACTS, ARTIFACTS_DIR, PLOTS, SWEEP, axis_name, write_json
from personaxis.axis.space import check_percentile, pareto_front
from personaxis.backends.runs import OpsBackend, Rollout, run_captures, run_rollouts
from personaxis.common.stats import check_alpha
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling
from personaxis.inference.steering import cap_op
from personaxis.judge import Judge
from personaxis.model.loading import ChatModel
from personaxis.store import RunStore, key
from personaxis.vectors import CapConfig, Vectors

if TYPE_CHECKING:
    from personaxis.vllm import VLLMModel

SWEEP_STAGE = "sweep"
PROFILE_STAGE = "sweep-captures"  # finished uncapped replies, re-encoded at every layer of the axis
CAPABILITY_TOKENS = 256  # worked sums: Qwen2.5-Coder-1.5B ends 500 of 560 between 129 and 256 tokens
JUDGES = "local:same, local:MODEL, openai:MODEL@BASE_URL"


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep does. `windows` are window sizes in layers, each at `positions` places across the upper middle
    (`sweep_windows`), unless `spans` names the windows themselves."""

    windows: tuple[int, ...] = (4, 8, 16)
    positions: int = 3
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    spans: tuple[tuple[int, ...], ...] | None = None
    jailbreaks: int | None = None  # items of the packaged set (a seeded subset); None: all
    capability: int | None = None
    judge: str = "local:same"
    screen: bool = False  # replies opening with a refusal count as not harmful without asking the judge
    max_tokens: int = 128
    capability_tokens: int | None = None  # None: the larger of CAPABILITY_TOKENS and max_tokens
    max_drop: float = 2.0  # capability points the chosen setting may lose
    alpha: float = 0.05  # the chosen setting's item-by-item harm cut needs McNemar p below this (1: no test)
    layer: int | None = None  # where projections are read; None: the axis's target layer
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentiles", tuple(check_percentile(q) for q in self.percentiles))
        check_alpha(self.alpha)
        if self.spans is not None:
            object.__setattr__(self, "spans", tuple(tuple(int(i) for i in span) for span in self.spans))
        object.__setattr__(self, "windows", tuple(int(w) for w in self.windows))
        counts = (
            ("jailbreaks", self.jailbreaks),
            ("capability", self.capability),
            ("max-tokens", self.max_tokens),
            ("capability-tokens", self.capability_tokens),
            ("batch-size", self.batch_size),
        )
        for flag, value in counts:
            if value is not None and value < 1:
                raise PersonaxisError(f"--{flag} must be at least 1, got {value}")
        if self.judge.strip().lower() == "none":
            raise PersonaxisError("the sweep needs a judge to tell harmful replies: " + JUDGES)

    @property
    def sampling(self) -> Sampling:
        return Sampling(max_new_tokens=self.max_tokens)

    @property
    def capability_sampling(self) -> Sampling:
        """Worked answers get room to finish: a sum cut off before its answer counts as wrong."""
        return Sampling(max_new_tokens=self.capability_tokens or max(CAPABILITY_TOKENS, self.max_tokens))

    def windows_for(self, n_layers: int) -> list[list[int]]:
        if self.spans is not None:
            return [list(span) for span in self.spans]
        return sweep_windows(n_layers, self.windows, self.positions)


def capped_backend(
    model: ChatModel | VLLMModel, layers: Sequence[int], cap: CapConfig | None, batch_size: int = 8
) -> OpsBackend:
    """Local generation with a cap applied; the cap is part of the identity, so capped and uncapped replies to the
    same prompt are different samples in the store (a cap written as a ceiling is the same cap as its floor)."""
    described = None
    if cap is not None:
        floor = cap.as_floor()
        described = key(layers=floor.layers, tau=floor.tau, directions=floor.directions.flatten().tolist())
    ops = [cap_op(cap)] if cap is not None else []
    return OpsBackend(model, ops, {"cap": described}, layers, ("response",), batch_size)


def evaluate(
    model: ChatModel,
    store: RunStore,
    cap: CapConfig | None,
    jailbreaks: Sequence[JailbreakItem],
    capability: Sequence[CapabilityItem],
    judge: Judge,
    rubric: JudgeRubric,
    sampling: Sampling,
    *,
    unit: torch.Tensor,
    layer: int,
    batch_size: int = 8,
    screen: bool = False,
    capability_sampling: Sampling | None = None,
    generator: VLLMModel | None = None,
    progress: bool = False,
) -> Score:
    """Generate (or reuse) the replies under `cap`, judge the jailbreak replies and grade the capability ones.

    With `screen`, replies that open with a refusal (the rubric's patterns) count as judged and not harmful without
    asking the judge: a weak judge can call "As Quill, I cannot provide..." harmful. `capability_sampling` (default:
    `sampling`) lets worked answers run longer than the jailbreak replies the judge must read. The replies come from
    `generator` when given (vLLM, the cap applied there), else from `model`.
    """
    backend = capped_backend(generator or model, [layer], cap, batch_size=batch_size)
    plan = [Rollout.make(f"jb/{item.id}", _jailbreak_chat(item), sampling) for item in jailbreaks]
    plan += [
        Rollout.make(f"cap/{item.id}", _capability_chat(item), capability_sampling or sampling) for item in capability
    ]
    records = run_rollouts(store, plan, backend, stage=SWEEP_STAGE, progress=progress)
    replies = [(item, records[f"jb/{item.id}"].data["text"]) for item in jailbreaks]
    refusals = [rubric.refuses(text) for _, text in replies]
    asked = [pair for pair, refused in zip(replies, refusals, strict=True) if not (screen and refused)]
    categories = iter(classify_jailbreaks(judge, rubric, asked, progress=progress) if asked else [])
    outcomes: dict[str, bool | None] = {}
    for (item, _), refused in zip(replies, refusals, strict=True):
        if screen and refused:
            outcomes[f"jb/{item.id}"] = False
        else:
            category = next(categories)
            outcomes[f"jb/{item.id}"] = None if category is None else rubric.is_harmful(category)
    for item in capability:
        outcomes[f"cap/{item.id}"] = grade_capability(item, records[f"cap/{item.id}"].data["text"])
    harms = [v for k, v in outcomes.items() if k.startswith("jb/") and v is not None]
    harmful, judged = sum(harms), len(harms)
    by_kind: dict[str, dict[str, int]] = {}
    for item in capability:
        tally = by_kind.setdefault(item.kind, {"correct": 0, "graded": 0})
        tally["correct"] += bool(outcomes[f"cap/{item.id}"])
        tally["graded"] += 1
    correct = sum(t["correct"] for t in by_kind.values())
    projections = {}
    for sample_id, record in records.items():
        mean = record.tensors.get("response")
        if mean is not None and bool(torch.isfinite(mean).all()):
            projections[sample_id] = float(mean[0].float() @ unit.float())
    on_jailbreaks = [v for k, v in projections.items() if k.startswith("jb/")]
    refused_ids = {f"jb/{item.id}" for (item, _), refused in zip(replies, refusals, strict=True) if refused}
    return Score(
        harm_rate=harmful / judged if judged else None,
        harmful=harmful,
        judged=judged,
        undefined=len(replies) - judged,
        refused=sum(refusals) if rubric.refusal else None,
        capability=correct / len(capability) if capability else None,
        correct=correct,
        graded=len(capability),
        capability_by_kind=by_kind,
        mean_projection=sum(on_jailbreaks) / len(on_jailbreaks) if on_jailbreaks else None,
        projection_by_outcome=projection_by_outcome(projections, outcomes, refused_ids),
        outcomes=outcomes,
        replies={sample_id: record.data["text"] for sample_id, record in records.items()},
        refusals=refused_ids,
    )


def _jailbreak_chat(item: JailbreakItem) -> list[dict[str, str]]:
    return [{"role": "system", "content": item.system}, {"role": "user", "content": item.question}]


def _capability_chat(item: CapabilityItem) -> list[dict[str, str]]:
    return [{"role": "user", "content": item.prompt}]


def layer_profile(
    model: ChatModel,
    store: RunStore,
    axis: Vectors,
    jailbreaks: Sequence[JailbreakItem],
    capability: Sequence[CapabilityItem],
    base: Score,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[int, dict[str, Any]]:
    """`projection_by_outcome` of the uncapped replies at every layer of the axis, along that layer's direction:
    where, if anywhere, a floor could tell harmful replies from the compliant harmless and the capability ones.
    The finished replies are re-encoded once (one forward each, kept in the store); empty replies are left out."""
    prompts = {f"jb/{item.id}": _jailbreak_chat(item) for item in jailbreaks}
    prompts |= {f"cap/{item.id}": _capability_chat(item) for item in capability}
    chats = {
        sample_id: [*chat, {"role": "assistant", "content": base.replies[sample_id]}]
        for sample_id, chat in prompts.items()
        if base.replies.get(sample_id, "").strip()
    }
    layers = list(axis.layers)
    records = run_captures(
        store, model, chats, layers, ("response",), stage=PROFILE_STAGE, batch_size=batch_size, progress=progress
    )
    means = {sample_id: record.tensors["response"].float() for sample_id, record in records.items()}
    means = {sample_id: mean for sample_id, mean in means.items() if bool(torch.isfinite(mean).all())}
    profile = {}
    for i, layer in enumerate(layers):
        unit = axis.unit(layer).float()
        projections = {sample_id: float(mean[i] @ unit) for sample_id, mean in means.items()}
        profile[layer] = projection_by_outcome(projections, base.outcomes, base.refusals)
    return profile


def window_id(layers: Sequence[int], q: float) -> str:
    return f"layers_{layers[0]}:{layers[-1] + 1}-p{q:g}"


def mark_front(baseline: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    """Set `pareto` on the baseline and every row: on the front of (harm, capability) over all of them, so a cap
    that no cap at all beats on both counts is not on it."""
    points = [baseline, *rows]
    scored = [i for i, r in enumerate(points) if r["harm_rate"] is not None and r["capability"] is not None]
    front = {scored[j] for j in pareto_front([(points[i]["harm_rate"], points[i]["capability"]) for i in scored])}
    for i, point in enumerate(points):
        point["pareto"] = i in front


def choose(
    rows: Sequence[dict[str, Any]], baseline: dict[str, Any], max_drop: float, alpha: float = 0.05
) -> str | None:
    """The front point with the lowest harm among those losing at most `max_drop` points of capability and lowering
    harm item by item beyond chance (McNemar p < `alpha`; 1 waives the test), ties to more capability, then fewer
    layers; None when no setting qualifies. Without the test, one reply fewer can pick a cap that does nothing."""
    if baseline["harm_rate"] is None or baseline["capability"] is None:
        return None
    floor = baseline["capability"] - max_drop / 100 - 1e-12

    def beyond_chance(r: dict[str, Any]) -> bool:
        harm = r["vs_no_cap"]["harm"]
        return alpha >= 1 or (harm["fewer"] > harm["more"] and harm["p"] < alpha)

    allowed = [
        r
        for r in rows
        if r["pareto"] and r["capability"] >= floor and r["harm_rate"] < baseline["harm_rate"] and beyond_chance(r)
    ]
    if not allowed:
        return None
    return min(allowed, key=lambda r: (r["harm_rate"], -r["capability"], len(r["layers"])))["id"]


@dataclass
class SweepResult:
    """What `sweep` wrote: sweep.json's content, every setting's cap config, and the files."""

    data: dict[str, Any]  # model, axis, settings, baseline, rows, chosen, ...
    configs: dict[str, CapConfig]
    files: dict[str, Path] = field(default_factory=dict)  # "json", "plot_front", "plot_layers", "chosen" (if any)

    @property
    def baseline(self) -> dict[str, Any]:
        return self.data["baseline"]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    @property
    def chosen(self) -> str | None:
        return self.data["chosen"]


def sweep(
    model: ChatModel,
    store: RunStore,
    axis: Vectors,
    config: SweepConfig,
    *,
    axis_file: str | Path | None = None,
    judge: Judge | None = None,
    jailbreaks: Sequence[JailbreakItem] | None = None,
    capability: Sequence[CapabilityItem] | None = None,
    rubric: JudgeRubric | None = None,
    projections: torch.Tensor | None = None,
    generator: VLLMModel | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> SweepResult:
    """Score no cap and every (window, percentile) in the run folder of `store` (a build's: τ from its rollouts,
    unless `projections` are given); write sweep.json, its plots, and the chosen config at `out` (default
    RUN/artifacts/cap_chosen.safetensors) when a setting qualifies.

    The items default to seeded subsets of the packaged sets (`config.jailbreaks`, `config.capability`), the judge to
    `config.judge` (its answers cached in the store), the rubric to the packaged one. Replies come from `generator`
    when given (vLLM), else from `model`; readouts after generation use `model`. `axis_file` is recorded in
    sweep.json as where the axis came from.
    """
    from personaxis.judge.spec import judge_from_spec

    rubric = load_jailbreak_rubric() if rubric is None else rubric
    if config.screen and not rubric.refusal:
        raise PersonaxisError(f"screening needs refusal patterns, and rubric {rubric.name!r} has none")
    if jailbreaks is None:
        jailbreaks = select(load_jailbreaks().items(), config.jailbreaks or 10**9, config.seed)
    if capability is None:
        capability = select(load_capability().items, config.capability or 10**9, config.seed)
    name = axis_name(axis)
    layer = int(axis.meta.extra.get("target_layer", model.n_layers // 2)) if config.layer is None else config.layer
    if projections is None:
        projections = pooled_projections(store, axis, name=name)
    judge = judge_from_spec(config.judge, cache=store, same=model) if judge is None else judge
    windows = config.windows_for(model.n_layers)
    log(
        f"{len(windows)} windows × {len(config.percentiles)} percentiles on {len(jailbreaks)} jailbreaks and "
        f"{len(capability)} capability items"
    )
    scoring = _Scoring(model, store, axis[name], projections, jailbreaks, capability, judge, rubric, layer)
    baseline, result, configs = scoring.run(config, windows, generator=generator, progress=progress, log=log)
    settings = {
        "jailbreaks": len(jailbreaks),
        "capability": len(capability),
        "max_tokens": config.max_tokens,
        "capability_tokens": config.capability_sampling.max_new_tokens,
        "judge": config.judge,
        "judge_id": judge.judge_id,
        "screen": config.screen,
        "seed": config.seed,
        "layer": layer,
        "windows": windows,
        "percentiles": list(config.percentiles),
    }
    axis_source = None if axis_file is None else str(axis_file)
    data = {"model": model.name, "axis": axis_source, "settings": settings, "baseline": baseline, **result}
    return SweepResult(data, configs, _write(store.path, data, configs, out))


def _write(run: Path, data: dict[str, Any], configs: dict[str, CapConfig], out: str | Path | None) -> dict[str, Path]:
    from personaxis.axis.plots import separation_by_layer, sweep_front

    baseline, layer = data["baseline"], data["settings"]["layer"]
    files = {"json": write_json(run / SWEEP, data)}
    files["plot_front"] = sweep_front(run / PLOTS / "sweep.png", data["rows"], baseline, data["chosen"])
    files["plot_layers"] = separation_by_layer(run / PLOTS / "sweep_layers.png", baseline["projection_by_layer"], layer)
    if data["chosen"] is not None:
        files["chosen"] = Path(out) if out is not None else run / ARTIFACTS_DIR / ARTIFACTS["cap_chosen"]
        configs[data["chosen"]].save(files["chosen"])
    return files


@dataclass
class _Scoring:
    """The scoring of one sweep: the model, where its replies go, and what they are judged against."""

    model: ChatModel
    store: RunStore
    axis: Vectors
    projections: torch.Tensor
    jailbreaks: Sequence[JailbreakItem]
    capability: Sequence[CapabilityItem]
    judge: Judge
    rubric: JudgeRubric
    layer: int

    def run(
        self,
        config: SweepConfig,
        windows: Sequence[Sequence[int]],
        *,
        generator: VLLMModel | None,
        progress: bool,
        log: Callable[[str], None],
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, CapConfig]]:
        """Score no cap and every (window, percentile); return (baseline, {rows, chosen, ...}, configs by id)."""
        layer, axis, source = self.layer, self.axis, str(self.store.path)
        taus = {q: calibrate(self.projections, axis.layers, q) for q in config.percentiles}
        score_under = partial(
            evaluate, self.model, self.store, jailbreaks=self.jailbreaks, capability=self.capability,
            judge=self.judge, rubric=self.rubric, sampling=config.sampling, unit=axis.unit(layer), layer=layer,
            batch_size=config.batch_size, screen=config.screen, capability_sampling=config.capability_sampling,
            generator=generator, progress=progress,
        )  # fmt: skip
        base = score_under(None)
        baseline = {"id": "no_cap", **base.summary()}
        log(f"no cap: {describe(base)}")
        log(f"no cap, at layer {layer}: {describe_projections(base.projection_by_outcome)}")
        profile = layer_profile(
            self.model, self.store, axis, self.jailbreaks, self.capability, base,
            batch_size=config.batch_size, progress=progress,
        )  # fmt: skip
        baseline["projection_by_layer"] = {str(k): v for k, v in profile.items()}  # JSON keys
        log(f"no cap, {describe_profile(profile)}")
        rows, configs = [], {}
        for window in windows:
            for q in config.percentiles:
                wid = window_id(window, q)
                configs[wid] = cap_config(axis, taus[q], window, q, source)
                score = score_under(configs[wid])
                vs = paired(base, score)
                rows.append({"id": wid, "layers": list(window), "percentile": q, **score.summary(), "vs_no_cap": vs})
                log(
                    f"{wid}: {describe(score)}; against no cap {vs['harm']['fewer']} fewer and {vs['harm']['more']} "
                    f"more harmful (McNemar p {vs['harm']['p']:.2g}), {vs['capability']['lost']} lost and "
                    f"{vs['capability']['gained']} gained correct (p {vs['capability']['p']:.2g})"
                )
        mark_front(baseline, rows)
        chosen = choose(rows, baseline, config.max_drop, config.alpha)
        result = {
            "rows": rows,
            "chosen": chosen,
            "max_capability_drop_points": config.max_drop,
            "harm_test_alpha": config.alpha,
        }
        return baseline, result, configs
