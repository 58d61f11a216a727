"""The `screen` command: rank a dataset's samples by ΔP along a trait (`personaxis.traits.screening`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from personaxis.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    GeneratorOpt,
    ModelOpt,
    VLLMArgsOpt,
    check_generator,
    check_output,
    load,
    number,
    open_generator,
)


def register(app: typer.Typer) -> None:
    """Add the `screen` command to the personaxis CLI."""
    app.command("screen")(screen_command)


def screen_command(
    data: Annotated[Path, typer.Argument(help="chats.jsonl; each chat ends with the assistant reply to screen")],
    trait_vectors: Annotated[Path, typer.Option("--trait-vectors", help="a vectors .safetensors file")],
    model: ModelOpt,
    layer: Annotated[int | None, number("default: the calibrated layer, else the middle one", min=0)] = None,
    out: Annotated[Path | None, typer.Option(help="ranked .jsonl or .parquet (default: DATA.screened.jsonl)")] = None,
    run: Annotated[Path, typer.Option(help="run folder caching the model's own replies and the captures")] = Path(
        "runs/screen"
    ),
    name: Annotated[str | None, typer.Option(help="which direction, if the file holds several")] = None,
    max_tokens: Annotated[int, number("length limit of the model's own replies", min=1)] = 256,
    batch_size: BatchSizeOpt = 8,
    generator: GeneratorOpt = "local",
    vllm_args: VLLMArgsOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Rank training samples by ΔP, how far their replies sit along a trait beyond the model's own replies."""
    from rich.console import Console

    from personaxis.inference.generation import Sampling
    from personaxis.inference.steering import default_layer
    from personaxis.store import RunStore
    from personaxis.traits.screening import OUTPUT_SUFFIXES, read_samples, screen, write_outputs
    from personaxis.vectors import Vectors

    console = Console(stderr=True)
    out = out or data.with_name(f"{data.stem}.screened.jsonl")
    inputs = [data, trait_vectors]
    check_output(out, inputs=inputs, suffixes=OUTPUT_SUFFIXES)
    for beside in (out.with_suffix(".png"), out.with_suffix(".summary.json")):  # written next to it
        check_output(beside, inputs=inputs)
    check_output(run, inputs=inputs, folder=True, option="--run")
    check_generator(generator, vllm_args)
    samples = read_samples(data)
    vectors = Vectors.load(trait_vectors)
    direction = vectors.resolve(name)
    chosen = default_layer(vectors) if layer is None else layer
    vectors.row(chosen)  # refuse a layer the file does not have before loading anything
    sampling = Sampling(max_new_tokens=max_tokens)
    store = RunStore(run)
    m = load(model, dtype, device)
    for warning in vectors.validate(m):
        console.print(f"warning: {warning}", markup=False, highlight=False)
    result = screen(m, samples, vectors, [chosen], store, name=direction, sampling=sampling, batch_size=batch_size,
                    generator=open_generator(m, generator, vllm_args, batch_size), progress=True)  # fmt: skip
    about = {"data": str(data), "vectors": str(trait_vectors), "direction": direction, "model": m.name,
             "max_new_tokens": max_tokens}  # fmt: skip
    png, summary = write_outputs(result, chosen, out, about)
    mean, rows = result.mean(chosen), result.ranked(chosen)
    missing = sum(row["delta_p"] is None for row in rows)
    typer.echo(f"mean ΔP {mean:.4g} over {len(rows) - missing} samples ({direction}, layer {chosen})")
    typer.echo(f"wrote {out}, {png}, {summary}")
    if missing:
        console.print(f"warning: {missing} prompts got an empty reply from the model; their ΔP is left empty")
