"""The `finetune` and `finetune-shift` commands. Kept free of heavy imports: the CLI imports this at start-up."""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from personaxis.cli.options import BatchSizeOpt, DeviceOpt, DtypeOpt, ModelOpt, SeedOpt, check_output, number, real
from personaxis.errors import PersonaxisError

if TYPE_CHECKING:
    from personaxis.traits.library import TraitSpec
    from personaxis.vectors import Vectors


def register(app: typer.Typer) -> None:
    """Add `finetune-shift` and `finetune` to the personaxis CLI."""
    app.command("finetune-shift")(shift_command)
    app.command("finetune")(finetune_command)


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message, markup=False, highlight=False)


def _trait(trait: str | None, vectors: Vectors) -> TraitSpec:
    """The trait named, else the one the vectors say they are (metadata, or a direction named after a shipped trait)."""
    from personaxis.traits.library import list_traits, load_trait
    from personaxis.traits.steer import named_trait

    if trait is not None:
        return load_trait(trait, strict=False)
    shipped = set(list_traits())
    for candidate in (named_trait(vectors), *vectors.names):
        if isinstance(candidate, str) and candidate in shipped:
            return load_trait(candidate)
    raise PersonaxisError("cannot tell which trait these vectors are for: name it with --trait (a name or a .json)")


def shift_command(
    base: Annotated[str, typer.Option(help="the model before finetuning")],
    tuned: Annotated[str, typer.Option(help="the finetuned model, or a LoRA adapter folder for --base")],
    trait_vectors: Annotated[Path, typer.Option("--trait-vectors", help="a vectors .safetensors file")],
    trait: Annotated[str | None, typer.Option(help="trait whose evaluation questions to use (name or .json)")] = None,
    layer: Annotated[int | None, number("layer to report (default: calibrated, else middle)", min=0)] = None,
    name: Annotated[str | None, typer.Option(help="which direction (default: the trait's, or the only one)")] = None,
    out: Annotated[Path | None, typer.Option(help="also write the per-layer shift as JSON")] = None,
    run: Annotated[Path | None, typer.Option(help="run folder to cache activations in (default: none kept)")] = None,
    batch_size: BatchSizeOpt = 8,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Δ = (mean last-prompt activation under the tuned model − under the base) · v̂, per layer."""
    from rich.console import Console
    from rich.table import Table

    from personaxis.finetune.shift import Shift, last_prompt_projection, load_tuned
    from personaxis.inference.steering import default_layer
    from personaxis.model import load_model
    from personaxis.store import RunStore, atomic_write_text
    from personaxis.vectors import Vectors

    console = Console()
    inputs = [trait_vectors, Path(trait) if trait is not None and Path(trait).is_file() else None]
    if out is not None:
        check_output(out, inputs=inputs, suffixes=(".json",))
    if run is not None:
        check_output(run, inputs=inputs, folder=True, option="--run")
    vectors = Vectors.load(trait_vectors)
    spec = _trait(trait, vectors)
    if name is None and spec.name in vectors.names:
        name = spec.name
    direction = vectors.resolve(name)
    chosen = default_layer(vectors) if layer is None else layer
    vectors.row(chosen)
    prompts = [[{"role": "user", "content": q}] for q in spec.questions.evaluation]
    with ExitStack() as stack:
        folder = run if run is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shift-")))
        store = stack.enter_context(RunStore(folder))
        projections = []
        for label, load in (("base", lambda: load_model(base, dtype=dtype, device=device)),
                            ("tuned", lambda: load_tuned(tuned, base, dtype=dtype, device=device))):  # fmt: skip
            with console.status(f"loading the {label} model..."):
                model = load()
            warnings = vectors.validate(model)  # raises if they do not fit
            for warning in warnings if label == "base" else ():  # a tuned model is another model by name
                _err(f"warning: {warning}")
            projections.append(
                last_prompt_projection(model, vectors, prompts, store, name=direction, batch_size=batch_size)
            )
            del model  # one model in memory at a time
    shift = Shift(list(vectors.layers), *projections)

    table = Table(title=f"finetuning shift along '{direction}' ({spec.name}: {len(prompts)} evaluation prompts)")
    for column in ("layer", "base · v̂", "tuned · v̂", "Δ"):
        table.add_column(column, justify="right")
    for j, i in enumerate(shift.layers):
        mark = " ←" if i == chosen else ""
        table.add_row(f"{i}{mark}", f"{shift.base[j]:.4f}", f"{shift.tuned[j]:.4f}", f"{shift.delta[j]:+.4f}")
    console.print(table)
    typer.echo(f"Δ at layer {chosen}: {shift.at(chosen):+.4f}")
    if out is not None:
        atomic_write_text(out, json.dumps({
            "base": base, "tuned": tuned, "vectors": str(trait_vectors), "direction": direction, "trait": spec.name,
            "n_prompts": len(prompts), "layer": chosen, "delta": shift.at(chosen),
            "per_layer": [{"layer": i, "base": float(shift.base[j]), "tuned": float(shift.tuned[j]),
                           "delta": float(shift.delta[j])} for j, i in enumerate(shift.layers)],
        }, indent=2) + "\n")  # fmt: skip
        typer.echo(f"wrote {out}")


def finetune_command(
    data: Annotated[Path, typer.Argument(help="chats.jsonl to train on (loss on assistant tokens only)")],
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="new folder for the LoRA adapter and its training config")],
    prevent: Annotated[Path | None, typer.Option(help="vectors to steer along while training (preventative)")] = None,
    alpha: Annotated[float | None, real("steering coefficient for --prevent")] = None,
    units: Annotated[
        str, typer.Option(help="relative (α·mean_norm·v̂; the paper's raw α = 5 is about 0.25 here) or raw (α·v)")
    ] = "relative",
    ablate: Annotated[Path | None, typer.Option(help="vectors to ablate while training (CAFT)")] = None,
    layers: Annotated[str | None, typer.Option(help="all, i,j,k or a:b (default: calibrated, else middle)")] = None,
    name: Annotated[str | None, typer.Option(help="which direction, if the file holds several")] = None,
    epochs: Annotated[int, number("passes over the data", min=1)] = 1,
    lr: Annotated[float, real("learning rate (above 0)")] = 1e-4,
    batch_size: BatchSizeOpt = 4,
    grad_accum: Annotated[int, number("micro-batches per optimizer step", min=1)] = 1,
    lora_r: Annotated[int, number("LoRA rank", min=1)] = 32,
    lora_alpha: Annotated[float, real("LoRA alpha (the update is scaled by alpha / r)", min=0.0)] = 64.0,
    lora_dropout: Annotated[float, real("LoRA dropout, in [0, 1)", min=0.0, max=1.0)] = 0.0,
    max_length: Annotated[int, number("longest chat trained on, in tokens", min=1)] = 1024,
    max_steps: Annotated[int | None, number("stop after this many optimizer steps", min=1)] = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Train a LoRA adapter, optionally steering along (or ablating) a trait direction only while it trains."""
    from personaxis.common.datasets import parse_layers, read_chats
    from personaxis.finetune.train import TrainConfig, check_adapter_dir, finetune
    from personaxis.inference.steering import ablate_op, default_layer, steer_op
    from personaxis.model import load_model
    from personaxis.vectors import Vectors

    check_output(out, inputs=[data, prevent, ablate], folder=True)
    if prevent is not None and ablate is not None:
        raise PersonaxisError("give --prevent or --ablate, not both")
    if (prevent is None) != (alpha is None):
        raise PersonaxisError("--prevent and --alpha go together")
    if layers is not None and prevent is None and ablate is None:
        raise PersonaxisError("--layers says where to steer or ablate: give --prevent or --ablate too")
    if units not in ("raw", "relative"):
        raise PersonaxisError(f"units must be raw or relative, got {units!r}")
    config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, lora_r=lora_r,
                         lora_alpha=lora_alpha, lora_dropout=lora_dropout, max_length=max_length,
                         max_steps=max_steps, seed=seed)  # fmt: skip
    chats = read_chats(data, need_assistant=True)
    check_adapter_dir(out)
    path = prevent or ablate
    vectors = Vectors.load(path) if path is not None else None
    if vectors is not None:
        vectors.resolve(name)
        if layers is None:
            vectors.row(default_layer(vectors))
    m = load_model(model, dtype=dtype, device=device)
    ops, notes = [], {"data_path": str(data)}
    if vectors is not None:
        for warning in vectors.validate(m):
            _err(f"warning: {warning}")
        if layers is None:
            chosen = [default_layer(vectors)]
        elif layers.strip() == "all":  # every layer the vectors cover
            chosen = list(vectors.layers)
        else:
            chosen = parse_layers(layers, m.n_layers)
        if prevent is not None:
            ops.append(steer_op(vectors, alpha, chosen, name=name, units=units))
        else:
            ops.append(ablate_op(vectors, chosen, name=name))
        notes["intervention"] = {
            "kind": "steer" if prevent is not None else "ablate", "vectors": str(path),
            "direction": vectors.resolve(name), "layers": chosen, "alpha": alpha,
            "units": units if prevent is not None else None, "vectors_config_hash": vectors.meta.config_hash,
        }  # fmt: skip
    result = finetune(m, chats, out, config, ops=ops, notes=notes, progress=True)
    first, last = result.losses[0], result.losses[-1]
    typer.echo(f"trained {len(result.losses)} steps on {result.n_examples} chats: loss {first:.4f} → {last:.4f}")
    typer.echo(f"wrote {out}")
