"""Command line for the Assistant Axis: `axis build|report|steer`, `cap calibrate|sweep|replay` and `drift`.

Thin: options are parsed and checked here, the work is done by `personaxis.axis.*`. Mistakes raise
`PersonaxisError` (one line, exit code 2 from the main entry point).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from personaxis.cli.options import (
    BackendOptions,
    DeviceOpt,
    DtypeOpt,
    GeneratorOpt,
    ModelOpt,
    VLLMArgsOpt,
    backend_options,
    check_generator,
    check_output,
    judge_on,
    load,
    open_generator,
)
from personaxis.errors import PersonaxisError

axis_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Build, inspect and steer along the Assistant Axis."
)
cap_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Activation capping along the Assistant Axis.")
console = Console()
err = Console(stderr=True)

AxisOpt = Annotated[Path, typer.Option("--axis", "-a", help="an axis artifact (.safetensors from `axis build`)")]
JUDGE_HELP = "local:same, local:MODEL, openai:MODEL@BASE_URL"


def _say(message: str) -> None:
    err.print(f"[dim]{message}[/dim]", highlight=False)


def _count(value: str | None, what: str) -> int | None:
    """'all' → None, else a positive integer."""
    if value is None or value.strip().lower() == "all":
        return None
    try:
        number = int(value)
    except ValueError:
        raise PersonaxisError(f"--{what} must be a number or 'all', got {value!r}") from None
    if number < 0:
        raise PersonaxisError(f"--{what} cannot be negative, got {number}")
    return number


def _numbers(text: str, what: str, kind: type = float) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PersonaxisError(f"--{what} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise PersonaxisError(f"--{what} is empty")
    return values


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


# --- axis build / report / steer ------------------------------------------------------------------------------------


@axis_app.command("build")
@backend_options
def build_cmd(
    model: ModelOpt,
    roles: Annotated[str | None, typer.Option(help="how many roles (a seeded subset), or 'all'")] = None,
    questions: Annotated[int | None, typer.Option(help="how many shared questions (seeded subset)")] = None,
    samples: Annotated[int | None, typer.Option(help="samples per prompt × question")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="reply length in tokens")] = None,
    judge: Annotated[str | None, typer.Option(help=f"role-adoption judge: {JUDGE_HELP}, or 'none' (keep all)")] = None,
    screen: Annotated[
        bool | None,
        typer.Option(
            "--screen/--no-screen",
            help="drop role replies that present themselves as an AI ('As an AI language model...') before judging",
        ),
    ] = None,
    min_count: Annotated[int | None, typer.Option(help="fewest replies scored 3 for a role to be kept")] = None,
    target_layer: Annotated[int | None, typer.Option(help="layer for the PCA (default: the middle block)")] = None,
    traits: Annotated[str | None, typer.Option(help="how many interpretation traits, or 'all'")] = None,
    run: Annotated[Path, typer.Option(help="run folder (resumable)")] = Path("runs/axis"),
    quick: Annotated[
        bool, typer.Option(help="8 spread roles, 6 questions, 1 sample, 48 tokens, unjudged: minutes on a CPU")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="seed for subsets and per-sample sampling")] = None,
    batch_size: Annotated[int | None, typer.Option(help="generation batch size")] = None,
    model_name: Annotated[
        str | None, typer.Option(help="fills 'You are {model_name}.' (default: from the model)")
    ] = None,
    roles_file: Annotated[Path | None, typer.Option(help="a roles library file (default: the packaged one)")] = None,
    questions_file: Annotated[Path | None, typer.Option(help="a questions file (default: the packaged one)")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    *,
    backend_options: BackendOptions,
):
    """Roll out roles and the default Assistant, judge role adoption, and compute the axis, persona space and traits.

    Ends by writing RUN/report.md. With --executor ray a local:same judge runs on the Ray workers too; see
    docs/scale.md for the backend options.
    """
    from personaxis.axis.build import QUICK, BuildConfig, build_axis
    from personaxis.axis.library import load_questions, load_roles
    from personaxis.axis.rollouts import CAPTURES
    from personaxis.axis.runfiles import REPORT

    base = QUICK if quick else BuildConfig()
    given = dict(questions=questions, samples=samples, max_tokens=max_tokens, judge=judge, screen=screen,
                 min_count=min_count, target_layer=target_layer, seed=seed, batch_size=batch_size,
                 model_name=model_name)  # fmt: skip
    overrides = {k: v for k, v in given.items() if v is not None}
    if roles is not None:
        overrides.update(roles=_count(roles, "roles"), quick_roles=False)
    if traits is not None:
        overrides["traits"] = _count(traits, "traits")
    config = replace(base, **overrides)
    backend_options.check()
    role_library = load_roles(roles_file) if roles_file else None
    question_library = load_questions(questions_file) if questions_file else None
    m = load(model, dtype, device)
    with backend_options.open(m, range(m.n_layers), CAPTURES, config.batch_size) as backend:
        judge_obj = _build_judge(backend, config.judge, run, m) if config.judged else None
        result = build_axis(
            m, run, config, judge=judge_obj, roles=role_library, questions=question_library, backend=backend, log=_say
        )
    _show_build(result.summary, m.name, run / REPORT)


def _build_judge(backend: Any, spec: str, run: Path, m: Any) -> Any:
    """The role-adoption judge: on the backend's workers when it runs there, else from its spec."""
    from personaxis.judge.spec import judge_from_spec
    from personaxis.store import RunStore

    store = RunStore(run)
    return judge_on(backend, spec, cache=store, model=m) or judge_from_spec(spec, cache=store, same=m)


def _show_build(s: dict[str, Any], name: str, report: Path) -> None:
    table = Table(title=f"Assistant Axis of {name}", show_header=False)
    kept, dropped, found = s["roles"]["kept"], s["roles"]["dropped"], s["ai_self_reference"]
    as_ai, rho = f"{found['replies']} of {found['of']}", found["pc1_spearman"]
    as_ai += "" if rho is None else f"; Spearman ρ of a role's share with PC1 {rho:.2f}"
    for label, value in (
        ("roles kept / dropped", f"{len(kept)} / {len(dropped)} {list(dropped)[:8]}"),
        ("judge", s["judge"]["mode"]),
        (f"PC1 variance (layer {s['target_layer']})", f"{100 * s['pca']['pc1_variance']:.1f}%"),
        ("PCs for 70%", s["pca"]["pcs_for_70_percent"]),
        ("|cos(PC1, axis)| at target", f"{s['axis']['pc1_cosine_at_target']:.3f}"),
        ("empty replies", s["counts"]["empty_replies"]),
        ("replies presenting as an AI", as_ai),
        ("artifacts", ", ".join(s["artifacts"].values())),
        ("report", report),
    ):
        table.add_row(label, str(value))
    console.print(table)


@axis_app.command("report")
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="a run folder written by `axis build`")]):
    """Write RUN_DIR/report.md with its plots (build, and drift/calibration/sweep when present)."""
    from personaxis.axis.report import write_report

    console.print(f"wrote {write_report(run_dir)}")


@axis_app.command("stability")
def stability_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run folder written by `axis build`")],
    sizes: Annotated[
        str | None, typer.Option(help="role counts to draw, e.g. 8,16,32 (default: 8, 16, 32... and all)")
    ] = None,
    repeats: Annotated[int, typer.Option(help="random subsets per role count")] = 50,
    layer: Annotated[int | None, typer.Option(help="layer (default: the build's target layer)")] = None,
    seed: Annotated[int, typer.Option(help="seed for the subsets")] = 0,
):
    """How |cos(PC1, axis)| and PC1's variance share depend on which roles, and how many, a build used.

    Redoes the build's analysis on random subsets of its role vectors (no model, seconds); writes
    RUN_DIR/stability.json and a plot, which `axis report` includes.
    """
    from personaxis.axis.stability import stability

    counts = _numbers(sizes, "sizes", int) if sizes else None
    result, files = stability(run_dir, counts, repeats=repeats, layer=layer, seed=seed)
    table = Table(title=f"persona space from subsets of the {result['roles_in_build']} roles, layer {result['layer']}")
    for column in ("roles", "subsets", "|cos(PC1, axis)| mean ± sd", "5–95%", "PC1 share mean ± sd"):
        table.add_column(column, justify="right")
    for r in result["rows"]:
        table.add_row(
            str(r["roles"]),
            str(r["subsets"]),
            f"{r['cosine_mean']:.3f} ± {r['cosine_sd']:.3f}",
            f"{r['cosine_p5']:.3f}–{r['cosine_p95']:.3f}",
            f"{r['pc1_variance_mean']:.1%} ± {r['pc1_variance_sd']:.1%}",
        )
    console.print(table)
    console.print(f"wrote {files['json']} and {files['plot']}")


@axis_app.command("compare")
def compare_cmd(
    run_a: Annotated[Path, typer.Argument(help="a run folder written by `axis build`")],
    run_b: Annotated[Path, typer.Argument(help="another one (another model, or other settings)")],
    out: Annotated[Path | None, typer.Option(help="JSON to write (default RUN_A/compare_<RUN_B name>.json)")] = None,
):
    """Do two builds order their shared roles alike? Correlation of PC1 loadings and of axis projections.

    The paper finds role loadings on PC1 agree across models (r > 0.92). A plot of the PC1 loadings is written
    beside the JSON.
    """
    from personaxis.axis.compare import MEASURES, write_comparison

    check_output(out, inputs=[run_a, run_b], suffixes=(".json",))
    result, path, figure = write_comparison(run_a, run_b, out)
    a, b = result["builds"]
    table = Table(title=f"{a['model']} (layer {a['layer']}) against {b['model']} (layer {b['layer']})")
    for column in ("roles by", "shared roles", "Pearson r", "p", "Spearman ρ", "p"):
        table.add_column(column, justify="right")
    for measure in MEASURES:
        r = result[measure]
        table.add_row(
            {"pc1": "PC1 loading", "axis": "axis projection"}[measure],
            str(r["roles"]),
            f"{r['pearson_r']:.3f}",
            f"{r['pearson_p']:.2g}",
            f"{r['spearman_rho']:.3f}",
            f"{r['spearman_p']:.2g}",
        )
    console.print(table)
    console.print(f"wrote {path} and {figure}")


@axis_app.command("steer")
def steer_cmd(
    model: ModelOpt,
    axis: AxisOpt,
    coef: Annotated[float, typer.Option(help="strength; + toward the Assistant, − away (× the layer's mean norm)")],
    prompt: Annotated[str, typer.Option("--prompt", "-p")],
    system: Annotated[str | None, typer.Option("--system", "-s")] = None,
    layers: Annotated[str | None, typer.Option(help="all, i,j,k or a:b (default: the axis's target layer)")] = None,
    units: Annotated[str, typer.Option(help="relative (c·mean_norm·â) or raw (c·a)")] = "relative",
    baseline: Annotated[bool, typer.Option(help="also print the unsteered reply")] = False,
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
):
    """Reply to a prompt steered along the Assistant Axis."""
    from personaxis.axis.runfiles import axis_name, load_axis
    from personaxis.common.datasets import parse_layers
    from personaxis.inference.generation import Sampling, generate
    from personaxis.inference.steering import project_op, steer_op

    sampling = Sampling(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    m = load(model, dtype, device)
    vectors, target = load_axis(axis, m, _say)
    name = axis_name(vectors)
    chosen = [target] if layers is None else parse_layers(layers, m.n_layers)
    monitor = project_op(vectors, target, name=name, label="axis")
    chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    runs = ([("unsteered", [])] if baseline else []) + [
        (f"coef {coef:+g}", [steer_op(vectors, coef, chosen, name=name, units=units)])
    ]
    for label, ops in runs:
        out = generate(m, [chat], sampling, ops=[*ops, monitor])[0]
        projection = out.projections["axis"].nanmean()
        err.print(f"[bold]{label}[/bold] [dim](mean projection on the axis at layer {target}: {projection:.2f})[/dim]")
        console.print(out.text, markup=False, highlight=False)


# --- drift ----------------------------------------------------------------------------------------------------------


def drift_cmd(
    model: ModelOpt,
    axis: AxisOpt,
    domain: Annotated[list[str] | None, typer.Option(help="coding, writing, therapy, philosophy; repeatable")] = None,
    simulated_user: Annotated[
        str | None,
        typer.Option(help="a simulated user instead of the script: local:same, local:MODEL or openai:MODEL@BASE_URL"),
    ] = None,
    turns: Annotated[int, typer.Option(help="user turns per simulated conversation")] = 10,
    conversations: Annotated[Path | None, typer.Option(help="a conversations file (default: the packaged set)")] = None,
    per_domain: Annotated[int | None, typer.Option(help="at most this many conversations per domain")] = None,
    max_turns: Annotated[int | None, typer.Option(help="keep only the first N scripted user turns")] = None,
    run: Annotated[Path | None, typer.Option(help="run folder (default: the build run holding the axis)")] = None,
    layer: Annotated[int | None, typer.Option(help="layer to project at (default: the axis's target layer)")] = None,
    max_tokens: int = 128,
    temperature: float = 0.7,
    seed: int = 0,
    batch_size: int = 8,
    generator: GeneratorOpt = "local",
    vllm_args: VLLMArgsOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
):
    """Project every assistant turn of multi-turn conversations on the Assistant Axis, by domain."""
    from personaxis.axis.drift import DriftConfig, describe_stats, run_drift
    from personaxis.axis.evals.conversations import load_conversations
    from personaxis.axis.runfiles import load_axis, run_of

    config = DriftConfig(
        domains=tuple(domain or ()), per_domain=per_domain, max_turns=max_turns, simulated_user=simulated_user,
        turns=turns, layer=layer, max_tokens=max_tokens, temperature=temperature, seed=seed, batch_size=batch_size,
    )  # fmt: skip
    library = load_conversations(conversations).conversations
    check_generator(generator, vllm_args)
    run = run or run_of(axis)
    m = load(model, dtype, device)
    vectors, _ = load_axis(axis, m, _say)
    vllm = open_generator(m, generator, vllm_args, batch_size)
    found = run_drift(m, vectors, config, axis_file=axis, run_dir=run, conversations=library, generator=vllm, log=_say)
    stats, layer, mode = found.data["stats"], found.data["layer"], found.data["mode"]
    table = Table(title=f"Drift along the axis at layer {layer} ({mode})")
    for column in ("domain", "conversations", "turns", "mean projection", "slope / turn", "speaks as an AI"):
        table.add_column(column, justify="right")
    for d, s in stats["domains"].items():
        slope = "–" if s["slope_per_turn"] is None else f"{s['slope_per_turn']:+.3f}"
        share = "–" if s["as_ai_share"] is None else f"{100 * s['as_ai_share']:.0f}%"
        table.add_row(d, str(s["conversations"]), str(s["turns"]), f"{s['mean']:.3f}", slope, share)
    console.print(table)
    for line in describe_stats(stats):
        console.print(line, highlight=False)
    console.print(f"wrote {found.files['json']} and {found.files['plot']}")


# --- cap calibrate / sweep / replay -------------------------------------------------------------------------------


@cap_app.command("calibrate")
def calibrate_cmd(
    model: ModelOpt,
    axis: AxisOpt,
    run: Annotated[Path, typer.Option(help="the build run folder whose rollouts are pooled")],
    percentile: Annotated[float, typer.Option(help="τ percentile, 0–100 (the paper: 25)")] = 25.0,
    layers: Annotated[
        str | None, typer.Option(help="window to cap, a:b or i,j,k (default: 8 layers at ~60–85%)")
    ] = None,
    window_size: Annotated[int, typer.Option(help="size of the default window")] = 8,
    out: Annotated[Path | None, typer.Option(help="output cap config (default RUN/artifacts/cap.safetensors)")] = None,
):
    """τ per layer from the pooled response-mean projections of a build's rollouts → a capping config (a floor on â)."""
    from personaxis.axis.calibration import CalibrationConfig, calibrate_cap
    from personaxis.model.loading import model_name

    check_output(out, inputs=[axis], suffixes=(".safetensors",))
    config = CalibrationConfig(percentile=percentile, layers=layers, window_size=window_size)
    done = calibrate_cap(model_name(model), axis, run, config, out=out)
    shown = Table(title=f"τ at the {percentile:g}th percentile of {done.data['n_rollouts']} pooled projections")
    shown.add_column("layer", justify="right")
    shown.add_column("τ", justify="right")
    for i in done.data["window"]:
        shown.add_row(str(i), f"{done.tau[i]:.3f}")
    console.print(shown)
    console.print(f"wrote {done.path} ({done.cap!r})")


@cap_app.command("sweep")
def sweep_cmd(
    model: ModelOpt,
    axis: AxisOpt,
    run: Annotated[Path, typer.Option(help="the build run folder (τ from its rollouts; sweep replies stored there)")],
    windows: Annotated[str, typer.Option(help="window sizes in layers")] = "4,8,16",
    positions: Annotated[int, typer.Option(help="window positions per size across the upper middle")] = 3,
    percentiles: Annotated[str, typer.Option(help="τ percentiles")] = "1,25,50,75",
    jailbreaks: Annotated[int | None, typer.Option(help="jailbreak items to use (seeded subset; default all)")] = None,
    capability: Annotated[int | None, typer.Option(help="capability items to use (seeded subset; default all)")] = None,
    judge: Annotated[str, typer.Option(help=f"jailbreak judge: {JUDGE_HELP}")] = "local:same",
    screen: Annotated[
        bool, typer.Option(help="count replies that open with a refusal as not harmful without asking the judge")
    ] = False,
    max_tokens: int = 128,
    capability_tokens: Annotated[
        int | None,
        typer.Option(
            help="reply length for capability items (default: the larger of 256 and --max-tokens): "
            "a worked sum cut off before its answer counts as wrong"
        ),
    ] = None,
    max_drop: Annotated[float, typer.Option(help="capability points the chosen setting may lose")] = 2.0,
    alpha: Annotated[
        float, typer.Option(help="the chosen setting's item-by-item harm cut needs McNemar p below this (1: no test)")
    ] = 0.05,
    out: Annotated[Path | None, typer.Option(help="chosen config (default RUN/artifacts/cap_chosen…)")] = None,
    seed: int = 0,
    batch_size: int = 8,
    generator: GeneratorOpt = "local",
    vllm_args: VLLMArgsOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
):
    """Score layer windows × τ percentiles on persona jailbreaks and capability; keep the best of the Pareto front."""
    from personaxis.axis.runfiles import build_store, load_axis
    from personaxis.axis.sweep import SweepConfig, sweep

    check_output(out, inputs=[axis], suffixes=(".safetensors",))
    config = SweepConfig(
        windows=tuple(_numbers(windows, "windows", int)), positions=positions,
        percentiles=tuple(_numbers(percentiles, "percentiles")), jailbreaks=jailbreaks, capability=capability,
        judge=judge, screen=screen, max_tokens=max_tokens, capability_tokens=capability_tokens, max_drop=max_drop,
        alpha=alpha, seed=seed, batch_size=batch_size,
    )  # fmt: skip
    check_generator(generator, vllm_args)
    m = load(model, dtype, device)
    vectors, _ = load_axis(axis, m, _say)
    store = build_store(run, m.name)
    vllm = open_generator(m, generator, vllm_args, batch_size)
    result = sweep(m, store, vectors, config, axis_file=axis, generator=vllm, out=out, log=_say)
    baseline, settings = result.baseline, result.data["settings"]
    table = Table(title="Pareto front (harm ↓, capability ↑)")
    for column in ("setting", "harm rate", "capability", "unjudged", "refusals", "mean proj."):
        table.add_column(column, justify="right", no_wrap=column == "setting")
    front = sorted((r for r in result.rows if r["pareto"]), key=lambda r: r["harm_rate"])
    for r in [baseline, *front]:
        mark = " ★" if r["id"] == result.chosen else ""
        table.add_row(
            r["id"] + mark,
            _fmt(r["harm_rate"]),
            _fmt(r["capability"]),
            str(r["undefined"]),
            "–" if r["refused"] is None else f"{r['refused']}/{settings['jailbreaks']}",
            _fmt(r["mean_projection"], ".2f"),
        )
    console.print(table)
    if result.chosen is None:
        console.print(
            f"no setting lowered harm (McNemar p < {alpha:g}) within {max_drop:g} capability points; no config written"
        )
    else:
        console.print(f"chosen {result.chosen}: wrote {result.files['chosen']}")
    files = result.files
    console.print(f"wrote {files['json']}, {files['plot_front']} and {files['plot_layers']}")


@cap_app.command("replay")
def replay_cmd(
    chats: Annotated[Path, typer.Argument(help="chat.jsonl: one {'messages': [...]} per line")],
    model: ModelOpt,
    config: Annotated[Path, typer.Option(help="a capping config (.safetensors)")],
    axis: Annotated[Path | None, typer.Option(help="axis to project on (default: the config's own direction)")] = None,
    layer: Annotated[int | None, typer.Option(help="layer to project at (default: the axis's target layer)")] = None,
    out: Annotated[
        Path | None, typer.Option(help="JSON with replies and projections (default: beside the chats)")
    ] = None,
    max_tokens: int = 128,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
):
    """The same user turns with and without capping: replies regenerated both ways, per-turn projections compared."""
    from personaxis.axis.replay import replay_to
    from personaxis.axis.runfiles import load_axis
    from personaxis.common.datasets import read_chats
    from personaxis.inference.generation import Sampling
    from personaxis.vectors import CapConfig

    check_output(out, inputs=[chats, config, axis], suffixes=(".json",))
    chat_list = read_chats(chats)
    cap = CapConfig.load(config)
    m = load(model, dtype, device)
    for warning in cap.validate(m):
        _say(f"warning: {warning}")
    vectors = None if axis is None else load_axis(axis, m, _say)[0]
    out = out or chats.with_name(chats.stem + ".replay.json")
    sampling = Sampling(max_new_tokens=max_tokens)
    data, figure = replay_to(out, m, chat_list, cap, sampling, axis=vectors, layer=layer, source=str(config))
    layer, results = data["layer"], data["chats"]
    table = Table(title=f"Projection on the axis at layer {layer} per assistant turn")
    for column in ("chat", "turn", "uncapped", "capped"):
        table.add_column(column, justify="right")
    for r in results:
        for t, (a, b) in enumerate(zip(r["uncapped"], r["capped"], strict=True), 1):
            table.add_row(str(r["chat"]), str(t), "–" if a is None else f"{a:.3f}", "–" if b is None else f"{b:.3f}")
    console.print(table)
    console.print(f"wrote {out} and {figure}")


def register(app: typer.Typer) -> None:
    """Add the top-level `drift` command to the main app (the sub-apps are added with `add_typer`)."""
    app.command("drift")(drift_cmd)


__all__ = ["axis_app", "cap_app", "register"]
