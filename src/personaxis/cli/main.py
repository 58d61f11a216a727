"""The personaxis command line: a thin face over the library.

User mistakes raise `PersonaxisError`; `main` prints them as one line on stderr and exits with code 2.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from personaxis.cli import axis as axis_cli
from personaxis.cli import finetune as finetune_cli
from personaxis.cli import screen as screen_cli
from personaxis.cli.options import (
    BatchSizeOpt,
    DtypeOpt,
    MaxTokensOpt,
    ModelOpt,
    OptionalSeedOpt,
    TemperatureOpt,
    VLLMArgsOpt,
    check_output,
    load,
    real,
)
from personaxis.cli.traits import register as register_traits
from personaxis.errors import PersonaxisError

if TYPE_CHECKING:
    from personaxis.inference.steering import Units

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from personaxis import __version__

        console.print(f"personaxis {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Persona vectors and the Assistant Axis on open-weights chat models."""


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="hub id, folder, .gguf or embedded name")], dtype: DtypeOpt = "auto"
):
    """Layers, hidden size, chat template and system-role support of a model."""
    m = load(model, dtype)
    table = Table(show_header=False)
    for key, value in (
        ("model", m.name),
        ("architecture", m.model_type),
        ("decoder blocks", f"{m.n_layers} (at {m.blocks_path})"),
        ("hidden size", m.hidden_size),
        ("dtype", str(m.dtype).removeprefix("torch.")),
        ("chat template", "yes" if m.has_chat_template else "no (a plain System/User/Assistant transcript is used)"),
        ("system role", "yes" if m.has_system_role else "no (system text is folded into the first user turn)"),
        ("layer convention", "layer i = output of decoder block i = hidden_states[i + 1]"),
    ):
        table.add_row(key, Text(str(value)))  # as written: `[i + 1]` is not rich markup
    console.print(table)


@app.command()
def extract(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="output .safetensors")],
    chats: Annotated[Path | None, typer.Option(help="chats.jsonl: one {'messages': [...]} per line")] = None,
    diff: Annotated[
        tuple[Path, Path] | None, typer.Option(help="POS.jsonl NEG.jsonl: write mean(pos) - mean(neg)")
    ] = None,
    layers: Annotated[str, typer.Option(help="all, i,j,k or a:b")] = "all",
    aggregation: Annotated[str, typer.Option(help="response, prompt or last_prompt")] = "response",
    name: Annotated[str, typer.Option(help="name of the direction in the file")] = "direction",
    points_toward: Annotated[str, typer.Option(help="what the + sign means")] = "the positive chats",
    batch_size: BatchSizeOpt = 8,
    force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    dtype: DtypeOpt = "auto",
):
    """Per-layer mean of response-token activations over chats, or the difference of two sets' means (with --diff it
    also prints the layers where the two sets separate best).

    Besides one pass over the chats, every file records the model's mean norm per layer on 16 short neutral texts,
    the unit of relative strengths: a fixed pass, whatever the number of chats (about 0.5 s of CPU on the embedded
    default model), so on a handful of chats it takes longer than the capture itself.
    """
    from personaxis.common.datasets import parse_layers, read_chats
    from personaxis.inference.means import best_layers, mean_difference, mean_vectors

    check_output(out, inputs=[chats, *(diff or ())], force=force)
    if (chats is None) == (diff is None):
        raise PersonaxisError("give either --chats FILE or --diff POS NEG")
    sets = [read_chats(p, need_assistant=True) for p in ([chats] if chats else list(diff))]
    m = load(model, dtype)
    chosen = parse_layers(layers, m.n_layers)
    if chats is not None:
        vectors = mean_vectors(m, sets[0], chosen, aggregation=aggregation, name=name, batch_size=batch_size)
    else:
        vectors = mean_difference(
            m, sets[0], sets[1], chosen, aggregation=aggregation, name=name, points_toward=points_toward,
            batch_size=batch_size,
        )  # fmt: skip
    vectors.save(out)
    console.print(
        f"wrote {out}: {len(vectors.layers)} layers × {vectors.hidden_size}, counts {vectors.meta.counts}",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip
    if diff is not None:
        best = best_layers(vectors)
        if best:
            console.print(
                "best-separating layers (Cohen's d of the two sets along the direction): "
                + ", ".join(f"{layer} (d {d:.1f})" for layer, d in best)
                + "; steer at one of them, e.g. --steer FILE:LAYER:0.15",
                markup=False, highlight=False, soft_wrap=True,
            )  # fmt: skip
        else:
            console.print("no per-layer separation: it needs two chats on each side at least", markup=False)


@app.command()
def generate(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p")],
    system: Annotated[str | None, typer.Option("--system", "-s")] = None,
    steer: Annotated[
        list[str] | None,
        typer.Option(
            help="FILE:LAYERS:COEF, LAYERS i, i,j or a:b (b excluded), COEF in --units or with its unit (0.15rel, "
            "4raw); FILE:LAYERS for a calibrated trait's strength at other layers; FILE alone for its own layer "
            "and strength; repeatable"
        ),
    ] = None,
    units: Annotated[
        str,
        typer.Option(
            help="unit of a STRENGTH given without one: relative (c·mean_norm·v̂; useful 0.05–0.3) or raw (c·v)"
        ),
    ] = "relative",
    cap: Annotated[Path | None, typer.Option(help="a capping config (.safetensors)")] = None,
    project: Annotated[list[Path] | None, typer.Option(help="vectors to read projections on; repeatable")] = None,
    max_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    seed: OptionalSeedOpt = None,
    dtype: DtypeOpt = "auto",
):
    """Reply to one prompt, optionally steered, capped and monitored."""
    from personaxis.common.datasets import parse_layers
    from personaxis.common.progress import working
    from personaxis.inference.generation import Sampling, generate_batch, prompt_ids
    from personaxis.inference.steering import cap_op, check_units, describe_strength, project_op, steer_op
    from personaxis.traits.steer import calibration_choice, trait_steer_op
    from personaxis.vectors import CapConfig, Vectors

    sampling = Sampling(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    default_units = check_units(units)
    parsed = [_parse_steer(s, default_units) for s in steer or []]
    loaded = [(path, Vectors.load(path), layer, strength) for path, layer, strength in parsed]
    capping = CapConfig.load(cap) if cap else None
    monitors = [(p, Vectors.load(p)) for p in project or []]
    m = load(model, dtype)
    ops = []
    for path, vectors, layer_spec, strength in loaded:
        vectors.validate(m)
        if strength is None and layer_spec is None:  # the layer and strength `trait calibrate` chose
            op = trait_steer_op(vectors)
            choice = calibration_choice(vectors) or {}
            coef, chosen_units = float(choice["coef"]), str(choice.get("units", "relative"))
        elif strength is None:  # the calibrated strength, at the layers given
            choice = calibration_choice(vectors) or {}
            if "coef" not in choice:
                raise PersonaxisError(f"{path} carries no calibrated strength: give FILE:LAYERS:COEF")
            coef, chosen_units = float(choice["coef"]), check_units(str(choice.get("units", "relative")))
            op = steer_op(vectors, coef, parse_layers(layer_spec, m.n_layers), units=chosen_units)
        else:
            coef, chosen_units = strength
            op = steer_op(vectors, coef, parse_layers(layer_spec, m.n_layers), units=chosen_units)
        ops.append(op)
        err.print(
            f"steering with {path.name} at layer(s) {_layer_list(op.layers)}: {describe_strength(coef, chosen_units)}",
            markup=False, highlight=False,
        )  # fmt: skip
    if capping is not None:
        capping.validate(m)
        ops.append(cap_op(capping))
    labels = {}
    for path, vectors in monitors:
        vectors.validate(m)
        label = Path(vectors.meta.extra.get("source", "")).stem or vectors.names[0]
        op = project_op(vectors, label=label)
        labels[label] = (path, op.layers)
        ops.append(op)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    with working(f"generating up to {max_tokens} tokens"):
        out = generate_batch(m, [prompt_ids(m, messages)], sampling, ops=ops)[0]
    console.print(out.text, markup=False, highlight=False)
    if out.cap_hits:
        err.print(f"[dim]cap moved {out.cap_hits} token×layer activations[/dim]")
    for name, values in out.projections.items():
        path, layers = labels.get(name, (None, []))
        per_layer = values.nanmean(dim=0)  # [layers]: each layer's mean over the reply tokens
        where = f"{path.name}, " if path is not None else ""
        read = f"layer {layers[0]}" if len(layers) == 1 else f"layers {_layer_list(list(layers))}"
        err.print(
            f"projection '{name}' ({where}read at {read}) over {values.shape[0]} reply tokens:", markup=False,
            highlight=False,
        )  # fmt: skip
        for layer, value in zip(layers, per_layer.tolist(), strict=False):
            err.print(f"  layer {layer}: mean {value:.3f}", markup=False, highlight=False)


def _layer_list(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


_STEER_FORM = "use FILE:LAYERS:COEF (e.g. evil.safetensors:20:0.15 or evil.safetensors:10:14:0.15), FILE:LAYERS or FILE"
_LAYER_LIST = re.compile(r"\s*(all|-?\d+(\s*,\s*-?\d+)*)\s*")
_LAYER_BOUND = re.compile(r"\s*(-?\d+)?\s*")


def _parse_steer(spec: str, default_units: Units) -> tuple[Path, str | None, tuple[float, Units] | None]:
    """`--steer FILE[:LAYERS[:COEF]]`, read from the right: LAYERS:COEF is `i:c` or `i,j:c`, a range needs its COEF
    (`a:b:c`), and LAYERS alone is `i` or `i,j`. A FILE whose own name holds colons is found if it exists."""
    from personaxis.inference.steering import parse_strength

    if Path(spec).expanduser().is_file():
        return Path(spec), None, None
    parts = spec.split(":")
    splits = [(":".join(parts[:k]), parts[k:]) for k in range(len(parts) - 1, 0, -1) if len(parts) - k <= 3]
    existing = [(f, rest) for f, rest in splits if f and Path(f).expanduser().is_file()]
    if not existing:
        named = [f for f, _ in splits if f.endswith(".safetensors")]
        missing = (named or [f for f, _ in splits[-1:]] or [spec])[0] or spec
        raise PersonaxisError(f"bad --steer {spec!r}: no such file {missing!r}; {_STEER_FORM}")
    file, fields = existing[0]
    *layer_fields, coef = fields if len(fields) > 1 else (*fields, None)
    if len(layer_fields) == 2:
        if not all(_LAYER_BOUND.fullmatch(x) for x in layer_fields):
            raise PersonaxisError(
                f"bad --steer {spec!r}: the layers {':'.join(layer_fields)!r} are not a:b; {_STEER_FORM}"
            )
    elif not _LAYER_LIST.fullmatch(layer_fields[0]):
        raise PersonaxisError(f"bad --steer {spec!r}: the layers {layer_fields[0]!r} are not i or i,j; {_STEER_FORM}")
    layers = ":".join(layer_fields)
    if coef is None:
        return Path(file), layers, None
    try:
        return Path(file), layers, parse_strength(coef, default_units)
    except PersonaxisError as e:
        raise PersonaxisError(f"bad --steer {spec!r}: {e}") from None


@app.command("export-gguf")
def export_gguf_cmd(
    vector: Annotated[Path, typer.Argument(help="a vectors .safetensors file")],
    out: Annotated[Path, typer.Option(help="output .gguf")],
    name: Annotated[str | None, typer.Option(help="which direction, if the file has several")] = None,
    layers: Annotated[
        str | None,
        typer.Option(help="i,j, a:b, all or calibrated (a calibrated trait's layer); default: all but layer 0"),
    ] = None,
    strength: Annotated[
        str | None,
        typer.Option(
            help="pre-scale so that llama.cpp's strength 1.0 steers like personaxis at this strength, in --units "
            "or with its unit (0.15rel, 4raw); default: a calibrated trait's strength, else the vectors unscaled"
        ),
    ] = None,
    units: Annotated[str, typer.Option(help="unit of --strength: relative (× mean norm, useful 0.05–0.3) or raw")] = (
        "relative"
    ),
    scale: Annotated[float, real("an extra factor on every direction (−1 flips the sign)")] = 1.0,
    force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
):
    """Write a llama.cpp control vector (direction.i = block i), ready for --control-vector-scaled FILE 1.0 when
    a strength is given or calibrated."""
    from personaxis.common.datasets import parse_layers
    from personaxis.inference.steering import check_units, describe_strength, parse_strength
    from personaxis.traits.steer import calibration_choice
    from personaxis.vectors import Vectors, export_gguf

    check_output(out, inputs=[vector], force=force)
    default_units = check_units(units)
    parsed = parse_strength(strength, default_units) if strength is not None else None
    vectors = Vectors.load(vector)
    n_layers = vectors.meta.n_layers or (max(vectors.layers) + 1)
    choice = calibration_choice(vectors) or {}
    if layers is not None and layers.strip() == "calibrated":
        if "layer" not in choice:
            raise PersonaxisError(f"{vector} carries no calibration: give --layers i,j or a:b")
        chosen = [int(choice["layer"])]
    elif layers is not None:
        chosen = parse_layers(layers, n_layers)
        if layers.strip() == "all":
            chosen = [i for i in chosen if i in vectors.layers]
    else:
        chosen = list(vectors.layers)
    dropped = 0 in chosen and (layers is None or layers.strip() == "all")
    if dropped:
        chosen.remove(0)
    missing = [i for i in chosen if i not in vectors.layers]
    if missing:
        raise PersonaxisError(
            f"--layers {layers}: the vectors have no direction at layer(s) {missing} "
            f"(they cover {_layer_list(vectors.layers)})"
        )
    if parsed is None and "coef" in choice:
        parsed = (float(choice["coef"]), check_units(str(choice.get("units", "relative"))))
    path = export_gguf(
        vectors, out, name=name, scale=scale, layers=chosen,
        strength=None if parsed is None else parsed[0], units=default_units if parsed is None else parsed[1],
    )  # fmt: skip
    if dropped:  # said once the file is written: a refusal stays one line
        err.print("note: layer 0 left out (llama.cpp control vectors cannot hold direction.0)", markup=False)
    where = f"layer(s) {_layer_list(chosen)}"
    if parsed is None:
        console.print(
            f"wrote {path}: {where}, unscaled (× {scale:g}); llama.cpp's strength multiplies the raw vectors. "
            "Give --strength (e.g. 0.15) for a file that is right at --control-vector-scaled FILE 1.0",
            markup=False, highlight=False,
        )  # fmt: skip
    else:
        console.print(
            f"wrote {path}: {where}, pre-scaled to {describe_strength(parsed[0] * scale, parsed[1])}; in llama.cpp: "
            f"--control-vector-scaled {path} 1.0",
            markup=False, highlight=False,
        )  # fmt: skip


@app.command("import")
def import_cmd(
    source: Annotated[
        Path, typer.Argument(help="a reference .pt file (vectors or a capping config) or folder, or a .gguf")
    ],
    out: Annotated[Path, typer.Option(help="output .safetensors")],
    model_id: Annotated[str | None, typer.Option(help="the model the vectors belong to")] = None,
    format: Annotated[
        str, typer.Option(help="auto, assistant_axis, role_vectors or persona_vectors (a bare tensor's layout)")
    ] = "auto",
    n_layers: Annotated[
        int | None, typer.Option(min=1, help="the model's block count: checks the file, settles a bare tensor")
    ] = None,
    experiment: Annotated[str | None, typer.Option(help="which experiment of a capping config to write")] = None,
    force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
):
    """Convert reference-format vectors or capping configs (assistant-axis, persona_vectors) or a llama.cpp control
    vector into a personaxis artifact."""
    from personaxis.vectors import import_gguf, import_reference

    check_output(out, inputs=[source, *(sorted(source.glob("*.pt")) if source.is_dir() else [])], force=force)
    if source.suffix == ".gguf":
        if format != "auto" or n_layers is not None or experiment is not None:
            raise PersonaxisError("--format, --n-layers and --experiment are for reference .pt files, not a .gguf")
        artifact = import_gguf(source)
    else:
        artifact = import_reference(source, format=format, model_id=model_id, n_layers=n_layers, experiment=experiment)
    artifact.save(out)
    console.print(f"wrote {out}: {artifact!r}")


@app.command()
def demo(
    model: ModelOpt = "default",
    out: Annotated[Path, typer.Option(help="folder for the vector it builds")] = Path("runs/demo"),
    dtype: DtypeOpt = "auto",
):
    """Extract a persona direction from contrasting system prompts, steer with it, and show the projections."""
    from personaxis.traits.demo import run_demo

    run_demo(load(model, dtype), out, console)


@app.command()
def serve(
    model: ModelOpt = "default",
    axis: Annotated[
        Path | None, typer.Option(help="Assistant Axis vectors: enables axis telemetry and the closed loop")
    ] = None,
    caps: Annotated[Path | None, typer.Option(help="a capping config (.safetensors)")] = None,
    vectors: Annotated[Path | None, typer.Option(help="a folder of vector files, named by file stem")] = None,
    host: Annotated[str, typer.Option(help="bind address; anything but loopback needs --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="PERSONAXIS_API_KEY")] = None,
    space: Annotated[Path | None, typer.Option(help="persona-space coordinates (JSON) for the dashboard")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="closed loop: cap a conversation once its axis projection falls below")
    ] = None,
    window: Annotated[int, typer.Option(min=1, help="closed loop: how many recent turns are averaged")] = 2,
    dtype: DtypeOpt = "auto",
    max_batch: Annotated[int, typer.Option(min=1, help="requests decoded together at most")] = 16,
    max_queue: Annotated[int, typer.Option(min=0, help="requests waiting at most (more get 429)")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="largest max_tokens a request may ask for")] = 1024,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="longest prompt accepted, in tokens")] = 8192,
    max_messages: Annotated[int, typer.Option(min=1, help="most messages in one request")] = 512,
    max_prompt_chars: Annotated[
        int, typer.Option(min=1, help="most characters of message content in one request (checked before tokenising)")
    ] = 200_000,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="largest request body, in bytes")] = 1_000_000,
    batch_invariant: Annotated[
        bool | None,
        typer.Option(help="greedy replies that never depend on the batch (default: on a CPU)", show_default=False),
    ] = None,
    engine: Annotated[str, typer.Option(help="hf (our runtime) or vllm (vLLM in this process; docs/vllm.md)")] = "hf",
    vllm_args: VLLMArgsOpt = None,
):
    """OpenAI-compatible server with per-request steering and capping, axis telemetry and a dashboard at /."""
    from personaxis.common.progress import working

    with working("starting the server"):  # the serving stack imports torch: seconds before anything else happens
        from personaxis.serve.app import Limits
        from personaxis.serve.run import run_server

    limits = Limits(
        max_batch=max_batch,
        max_queue=max_queue,
        max_tokens=max_tokens,
        default_max_tokens=min(Limits.default_max_tokens, max_tokens),
        max_prompt_tokens=max_prompt_tokens,
        max_messages=max_messages,
        max_prompt_chars=max_prompt_chars,
        max_body_bytes=max_body_bytes,
    )
    run_server(
        model, host=host, port=port, axis_path=axis, caps_path=caps, vectors_dir=vectors, api_key=api_key,
        space_path=space, threshold=threshold, window=window, dtype=dtype, limits=limits,
        batch_invariant=batch_invariant, engine=engine, vllm_args=vllm_args,
    )  # fmt: skip


screen_cli.register(app)  # screen
finetune_cli.register(app)  # finetune-shift, finetune
register_traits(app)  # trait new|extract|calibrate|monitor-eval|report, monitor
app.add_typer(axis_cli.axis_app, name="axis")  # axis build|report|steer
app.add_typer(axis_cli.cap_app, name="cap")  # cap calibrate|sweep|replay
axis_cli.register(app)  # drift


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own status line says what is loading
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer()
            for noisy in _NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=noisy)
            app(prog_name="personaxis", standalone_mode=False)
    except PersonaxisError as exc:
        _fail(str(exc))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage: an unknown option, a bad value, a missing argument
        message = exc.format_message().rstrip(".")
        if not message:  # a command group called bare: its help is already printed
            sys.exit(2)
        context = getattr(exc, "ctx", None)
        _fail(message + (f" (see: {context.command_path} --help)" if context is not None else ""))


_DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_NOISY_WARNINGS = (  # said better by our own message, or nothing a user can act on
    r"Detected pickle protocol",  # torch.load, before the refusal that names the file
)


def _warning_printer():  # noqa: ANN202 - the signature of `warnings.showwarning`
    """Python warnings as one line each on stderr, `warning: ...`, each text once; the deprecation notes that torch,
    transformers and other libraries address to developers are left out: a user can do nothing about them."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = " ".join(str(message).split())
        if issubclass(category, _DEVELOPER_WARNINGS) and "personaxis" not in str(filename):
            return
        if text not in shown:
            shown.add(text)
            err.print(f"warning: {text}", markup=False, highlight=False, emoji=False, soft_wrap=True)

    return show


def _fail(message: str) -> None:
    err.print(f"error: {message}", markup=False, highlight=False, emoji=False, soft_wrap=True)
    sys.exit(2)
