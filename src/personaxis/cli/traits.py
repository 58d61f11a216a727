"""`personaxis trait ...` and `personaxis monitor`: the persona-vector pipeline from the command line.

A trait run lives in one folder (default ``runs/traits/<trait>-<model>``): `extract` fills it, `calibrate` and
`monitor-eval` add to it, `report` summarizes it. Every stage resumes: rerun the same command after an interruption
and only the missing rollouts and judgements are computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from personaxis.cli.options import (
    BackendOptions,
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    MaxTokensOpt,
    ModelOpt,
    SeedOpt,
    TemperatureOpt,
    backend_options,
    check_output,
    finite_floats,
    judge_on,
    load,
    number,
    real,
)
from personaxis.errors import PersonaxisError

if TYPE_CHECKING:
    from personaxis.traits.library import TraitSpec

trait_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Persona vectors for one trait: write its file, extract, calibrate steering, evaluate monitoring, report.",
)
console = Console()
err = Console(stderr=True)

TraitArg = Annotated[str, typer.Argument(help="a shipped trait name (evil, humorous...) or a trait .json file")]
JudgeOpt = Annotated[str, typer.Option(help="local:MODEL, local:same (the studied model) or openai:MODEL@BASE_URL")]
VectorsOpt = Annotated[Path, typer.Option("--vectors", "-v", help="the trait's vectors.safetensors")]
RunOpt = Annotated[Path | None, typer.Option(help="run folder (default: runs/traits/<trait>-<model>)")]
AnyCountsOpt = Annotated[bool, typer.Option(help="accept trait files with other than 5 pairs and 20 + 20 questions")]
ScoreOpt = Annotated[float, real("a judge score threshold (scores run 0 to 100)")]


def _trait(name: str, any_counts: bool):
    from personaxis.traits.library import load_trait

    return load_trait(name, strict=not any_counts)


def _check_judge(spec: str) -> None:
    """Refuse a malformed judge spec before minutes go into loading a model."""
    from personaxis.judge.spec import JUDGE_HELP

    kind, _, rest = spec.partition(":")
    if not ((kind == "local" and rest) or (kind == "openai" and "@" in rest)):
        raise PersonaxisError(f"bad judge {spec!r}: use {JUDGE_HELP}")


def _judge(spec: str, store, model, device: str | None = None):
    """The judge; a local one other than the studied model is loaded on the same device."""
    from personaxis.judge.spec import judge_from_spec

    kind, _, rest = spec.partition(":")
    if kind == "local" and rest and rest != "same":
        return judge_from_spec("local:same", cache=store, same=load(rest, device=device))
    return judge_from_spec(spec, cache=store, same=model)


def _vectors(path: Path, model, trait: TraitSpec | None = None):
    """The vectors, checked against the model and, for the trait commands, against the trait: calibrating one
    trait on another's vectors would overwrite their calibration with a meaningless one."""
    from personaxis.traits.steer import named_trait
    from personaxis.vectors import Vectors

    vectors = Vectors.load(path)
    for warning in vectors.validate(model):
        err.print(f"[yellow]warning:[/yellow] {warning}")
    named = named_trait(vectors)
    if trait is not None and named is not None and named != trait.name:
        raise PersonaxisError(f"{path} holds persona vectors for {named!r}, not {trait.name!r}")
    if trait is not None and named is None:
        err.print(f"[yellow]warning:[/yellow] {path} does not say which trait it is for; using it for {trait.name!r}")
    return vectors


def _trait_file(trait: str) -> Path | None:
    """The trait's file when the argument names one (an input no output may overwrite), else None."""
    path = Path(trait)
    return path if path.is_file() else None


def _run_folder(run: Path | None, trait: TraitSpec, model: str) -> Path:
    """The run folder: `--run`, else runs/traits/<trait>-<model> (named without loading the model)."""
    from personaxis.model.loading import model_name
    from personaxis.traits.files import slug

    return run or Path("runs/traits") / f"{trait.name}-{slug(model_name(model))}"


@trait_app.command("new")
def new(
    name: Annotated[str, typer.Argument(help="the trait's name: lowercase letters, digits, '_' or '-'")],
    description: Annotated[str, typer.Option(help="one sentence or paragraph saying what the trait is")],
    generator: Annotated[str, typer.Option(help="local:MODEL or openai:MODEL@BASE_URL")],
    out: Annotated[Path | None, typer.Option(help="where to write the trait file (default: NAME.json)")] = None,
    attempts: Annotated[int, number("tries before giving up on malformed output", min=1)] = 3,
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
):
    """Have a generator LLM write a trait file (5 prompt pairs, 20 + 20 questions, a rubric) to edit and use."""
    from personaxis.traits.generator import generator_from_spec, write_trait
    from personaxis.traits.library import save_trait

    path = out or Path(f"{name}.json")
    if path.exists() and not force:
        raise PersonaxisError(f"{path} exists: pass --force to overwrite it or --out for another file")
    check_output(path)
    gen = generator_from_spec(generator)
    with console.status(f"{gen.name} is writing the {name} trait..."):
        spec = write_trait(name, description, gen, attempts=attempts)
    save_trait(spec, path)
    console.print(f"wrote {path}: review and edit it, then `personaxis trait extract {path} --model ...`")


@trait_app.command("extract")
@backend_options
def extract(
    trait: TraitArg,
    model: ModelOpt,
    judge: JudgeOpt = "local:same",
    samples: Annotated[int, number("samples per (question, instruction pair, polarity)")] = 1,
    run: RunOpt = None,
    layers: Annotated[str, typer.Option(help="all, i,j,k or a:b")] = "all",
    questions: Annotated[int | None, number("use the first N extraction questions")] = None,
    pairs: Annotated[int | None, number("use the first N instruction pairs")] = None,
    max_tokens: MaxTokensOpt = 64,
    temperature: TemperatureOpt = 1.0,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 8,
    pos_min: Annotated[float, real("keep a pair if its pos reply scores at least this")] = 50.0,
    neg_max: Annotated[float, real("... and its neg reply scores below this")] = 50.0,
    coherence_min: Annotated[float, real("... and both are at least this coherent")] = 50.0,
    min_gap: Annotated[
        float,
        real("... and pos outscores neg by at least this (for judges that squeeze the scale)"),
    ] = 0.0,
    min_pairs: Annotated[int, number("fewer kept pairs than this is an error")] = 5,
    any_counts: AnyCountsOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    *,
    backend_options: BackendOptions,
):
    """Rollouts under eliciting and suppressing prompts, judged and filtered in pairs, to vectors at every layer.

    With --executor ray a local:same judge runs on the Ray workers too; see docs/scale.md for the backend options.
    """
    from personaxis.common.datasets import parse_layers
    from personaxis.store import RunStore
    from personaxis.traits.extraction import CAPTURES, ExtractSettings, Thresholds, extract_trait, extraction_layers
    from personaxis.traits.files import SAMPLES, VECTORS

    spec = _trait(trait, any_counts)
    folder = _run_folder(run, spec, model)
    check_output(folder, inputs=[_trait_file(trait)], folder=True, writes=[VECTORS, SAMPLES], option="--run")
    _check_judge(judge)
    backend_options.check()
    settings = ExtractSettings(
        samples=samples, max_new_tokens=max_tokens, temperature=temperature, seed=seed, questions=questions,
        pairs=pairs, batch_size=batch_size, thresholds=Thresholds(pos_min, neg_max, coherence_min, min_gap),
        min_pairs=min_pairs,
    )  # fmt: skip
    m = load(model, dtype, device)
    store = RunStore(folder)
    chosen = extraction_layers(m, parse_layers(layers, m.n_layers))
    with backend_options.open(m, chosen, CAPTURES, batch_size) as backend:
        judge_obj = judge_on(backend, judge, cache=store, model=m) or _judge(judge, store, m, device)
        result = extract_trait(m, spec, judge_obj, store, settings, chosen, backend=backend)
    s = result.stats
    console.print(
        f"kept {s['kept']} of {s['pairs']} pairs (judge: {s['judge']['failed']} failed, {s['judge']['undefined']} "
        f"undefined of {s['judge']['asked']} calls); wrote {store.path / VECTORS}"
    )


@trait_app.command("calibrate")
def calibrate(
    trait: TraitArg,
    model: ModelOpt,
    vectors: VectorsOpt,
    judge: JudgeOpt = "local:same",
    layers: Annotated[str | None, typer.Option(help="layers to sweep (default: 5 across the middle)")] = None,
    coefs: Annotated[str, typer.Option(help="strengths in relative units (c · mean_norm · v̂)")] = "",
    questions: Annotated[int, number("use the first N evaluation questions", min=1)] = 5,
    samples: Annotated[int, number("samples per (question, setting)", min=1)] = 1,
    max_tokens: MaxTokensOpt = 64,
    temperature: TemperatureOpt = 0.0,
    coherence_min: ScoreOpt = 50.0,
    repetition_max: Annotated[
        float,
        real("never choose a setting whose replies repeat more than this share of themselves (0-1)"),
    ] = 0.5,
    alpha: Annotated[
        float,
        real("the chosen setting's per-question rise needs sign-flip p below this (1: no test)"),
    ] = 0.05,
    batch_size: BatchSizeOpt = 8,
    run: Annotated[Path | None, typer.Option(help="run folder (default: the vectors' folder)")] = None,
    any_counts: AnyCountsOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
):
    """Sweep layers × strengths on held-out questions; store the best coherent (layer, strength) in the vectors."""
    from personaxis.common.datasets import parse_layers
    from personaxis.store import RunStore
    from personaxis.traits import calibrate as cal
    from personaxis.traits.files import CALIBRATION, CALIBRATION_PLOT, write_json
    from personaxis.traits.plots import plot_calibration

    spec = _trait(trait, any_counts)
    inputs = [_trait_file(trait), vectors]
    check_output(vectors, inputs=[_trait_file(trait)], option="--vectors")  # rewritten with the calibration in it
    check_output(
        run or vectors.parent, inputs=inputs, folder=True, writes=[CALIBRATION, CALIBRATION_PLOT], option="--run"
    )
    _check_judge(judge)
    settings = cal.CalibrateSettings(
        coefs=finite_floats(coefs, "--coefs") if coefs else cal.DEFAULT_COEFS, questions=questions, samples=samples,
        max_new_tokens=max_tokens, temperature=temperature, coherence_min=coherence_min,
        repetition_max=repetition_max, alpha=alpha, batch_size=batch_size,
    )  # fmt: skip
    m = load(model, dtype, device)
    v = _vectors(vectors, m, spec)
    store = RunStore(run or vectors.parent)
    chosen = parse_layers(layers, m.n_layers) if layers else None
    result = cal.calibrate(m, spec, v, _judge(judge, store, m, device), store, chosen, settings)
    write_json(store.path / CALIBRATION, result)
    plot_calibration(result, store.path / CALIBRATION_PLOT)
    v.meta.extra["calibration"] = cal.summary(result)
    v.save(vectors)
    table = Table(title=f"{spec.name}: Spearman ρ of trait score vs strength")
    table.add_column("layer")
    table.add_column("ρ", justify="right")
    for layer, rho in result["spearman"].items():
        table.add_row(layer, "—" if rho is None else f"{rho:+.2f}")
    console.print(table)
    choice = result["choice"]
    if choice:
        console.print(
            f"chose layer {choice['layer']}, c = {choice['coef']:g} (trait {choice['trait']:.1f}, coherence "
            f"{choice['coherence']:.1f}, p = {choice['p']:.2g}); stored in {vectors}; "
            f"plot {store.path / CALIBRATION_PLOT}"
        )
    else:
        err.print(
            "[yellow]no steered setting raised the trait score above the unsteered baseline"
            + (f" question by question (p < {alpha:g})" if alpha < 1 else "")
            + f" with coherence ≥ {coherence_min:g} and repetition ≤ {repetition_max:g}: nothing chosen[/yellow] "
            f"(plot {store.path / CALIBRATION_PLOT}); try other --coefs or --layers, or more --questions"
        )


@trait_app.command("monitor-eval")
def monitor_eval(
    trait: TraitArg,
    model: ModelOpt,
    vectors: VectorsOpt,
    judge: JudgeOpt = "local:same",
    pairs: Annotated[int, number("instruction pairs to grade (8 levels each)", min=1)] = 1,
    questions: Annotated[int, number("use the first N evaluation questions", min=1)] = 5,
    few_shot: Annotated[bool, typer.Option(help="add few-shot variants built from kept extraction replies")] = True,
    max_tokens: MaxTokensOpt = 64,
    temperature: TemperatureOpt = 0.0,
    batch_size: BatchSizeOpt = 8,
    run: Annotated[Path | None, typer.Option(help="run folder (default: the vectors' folder)")] = None,
    any_counts: AnyCountsOpt = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
):
    """Does the last prompt token's projection predict the reply's trait score? Pearson r and a scatter plot."""
    from personaxis.store import RunStore
    from personaxis.traits import monitor as mon
    from personaxis.traits.files import MONITOR, MONITOR_PLOT, SAMPLES, read_jsonl, write_json
    from personaxis.traits.plots import plot_monitor

    spec = _trait(trait, any_counts)
    inputs = [_trait_file(trait), vectors]
    check_output(run or vectors.parent, inputs=inputs, folder=True, writes=[MONITOR, MONITOR_PLOT], option="--run")
    _check_judge(judge)
    settings = mon.MonitorSettings(
        pairs=pairs, questions=questions, few_shot=few_shot, max_new_tokens=max_tokens, temperature=temperature,
        batch_size=batch_size,
    )  # fmt: skip
    m = load(model, dtype, device)
    v = _vectors(vectors, m, spec)
    store = RunStore(run or vectors.parent)
    samples = vectors.parent / SAMPLES
    examples = mon.examples_from_samples(read_jsonl(samples)) if samples.is_file() else None
    result = mon.monitor_eval(m, spec, v, _judge(judge, store, m, device), store, settings, examples)
    write_json(store.path / MONITOR, result)
    plot_monitor(result, store.path / MONITOR_PLOT)
    if result["layer"] is None:
        err.print("[yellow]r is undefined: too few scored replies or no variation[/yellow]")
        return
    console.print(
        f"Pearson r = {result['r_layer']:+.3f} at layer {result['layer']} over {result['n_scored']} scored replies "
        f"(best layer {result['best_layer']}: {result['r_best']:+.3f}); plot {store.path / MONITOR_PLOT}"
    )


@trait_app.command("report")
def report(run: Annotated[Path, typer.Argument(help="a trait run folder")]):
    """Write report.md with plots for a trait run folder."""
    from personaxis.traits.files import REPORT
    from personaxis.traits.report import write_report

    check_output(run, folder=True, writes=[REPORT], option="RUN")
    console.print(f"wrote {write_report(run)}")


def monitor(
    model: ModelOpt,
    vectors: VectorsOpt,
    chat: Annotated[Path | None, typer.Option(help="chats.jsonl: one {'messages': [...]} per line")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p")] = None,
    system: Annotated[str | None, typer.Option("--system", "-s")] = None,
    layer: Annotated[int | None, number("layer to read (default: the calibrated one)", min=0)] = None,
    direction: Annotated[str | None, typer.Option(help="which direction of the file (default: the trait's)")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
):
    """Print the projection of the last prompt token on a trait vector: how strongly the reply will show the trait."""
    from personaxis.common.datasets import read_chats
    from personaxis.traits.monitor import prompt_projections
    from personaxis.traits.steer import calibration_choice

    if (chat is None) == (prompt is None):
        raise PersonaxisError("give either --chat FILE.jsonl or --prompt TEXT")
    if chat is not None and system is not None:
        raise PersonaxisError("--system goes with --prompt; put system messages in the chat file")
    chats = (
        read_chats(chat)
        if chat is not None
        else [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]]
    )
    m = load(model, dtype, device)
    v = _vectors(vectors, m)
    if layer is None:
        layer = (calibration_choice(v) or {}).get("layer")
    if layer is None:
        raise PersonaxisError("these vectors carry no calibration: pass --layer")
    k = v.row(layer)
    values = prompt_projections(m, v, chats, direction)[:, k]
    if prompt is not None:
        console.print(f"{float(values[0]):.4f}")
        return
    table = Table(title=f"last-prompt projection at layer {layer}")
    table.add_column("chat", justify="right")
    table.add_column("projection", justify="right")
    table.add_column("last message")
    for i, (value, c) in enumerate(zip(values.tolist(), chats, strict=True)):
        table.add_row(str(i + 1), f"{value:.4f}", " ".join(c[-1]["content"].split())[:70])
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add `trait ...` and the top-level `monitor` to the main app."""
    app.add_typer(trait_app, name="trait")
    app.command("monitor")(monitor)
