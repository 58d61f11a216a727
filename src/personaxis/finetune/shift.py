"""Finetuning shift: how far finetuning moved a model along a trait, read before looking at a single reply.

``Δ_i = (mean over prompts of a_i(last prompt token) under the tuned model − the same under the base) · v̂_i``
(Chen et al. 2025): the last prompt token is where the model settles how to answer, so its average drift along the
trait direction over the trait's held-out evaluation questions predicts how much more (or less) the tuned model will
express the trait.

Activations are read through the rollout stage with a one-token reply: the prefill records the last prompt token, and
the run store keeps them, keyed by model, so an interrupted or repeated comparison reuses what it has.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from personaxis.backends.runs import LocalBackend, Rollout, run_rollouts
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling
from personaxis.model import ChatModel, load_model
from personaxis.store import RunStore
from personaxis.vectors import Vectors


@dataclass
class Shift:
    """Mean last-prompt-token projections on v̂ under both models, per layer of the vectors."""

    layers: list[int]
    base: torch.Tensor  # [L]
    tuned: torch.Tensor  # [L]

    @property
    def delta(self) -> torch.Tensor:
        return self.tuned - self.base

    def at(self, layer: int) -> float:
        if layer not in self.layers:
            raise PersonaxisError(f"no shift measured at layer {layer} (layers {self.layers})")
        return float(self.delta[self.layers.index(layer)])


def last_prompt_projection(
    model: ChatModel,
    vectors: Vectors,
    prompts: Sequence[Sequence[dict[str, str]]],
    store: RunStore,
    *,
    name: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """[L] (mean over prompts of the last prompt token's activation) · v̂, at every layer of `vectors`."""
    if not prompts:
        raise PersonaxisError("no prompts to measure the shift on")
    vectors.validate(model)
    rollouts = [Rollout.make(f"q{i}", chat, Sampling(max_new_tokens=1)) for i, chat in enumerate(prompts)]
    backend = LocalBackend(model, vectors.layers, captures=("last_prompt",), batch_size=batch_size)
    records = run_rollouts(store, rollouts, backend, stage="shift", progress=progress)
    mean = torch.stack([records[r.id].tensors["last_prompt"].float() for r in rollouts]).mean(dim=0)  # [L, H]
    return (mean * vectors.units(name)).sum(dim=-1)


def finetune_shift(
    base: ChatModel,
    tuned: ChatModel,
    vectors: Vectors,
    prompts: Sequence[Sequence[dict[str, str]]],
    store: RunStore,
    *,
    name: str | None = None,
    batch_size: int = 8,
) -> Shift:
    """Δ per layer for two models held at once (the CLI loads them one after the other instead)."""
    if base.name == tuned.name:
        raise PersonaxisError(f"base and tuned model are both named {base.name!r}: the run store could not tell apart")
    kwargs = {"name": name, "batch_size": batch_size}
    return Shift(
        list(vectors.layers),
        last_prompt_projection(base, vectors, prompts, store, **kwargs),
        last_prompt_projection(tuned, vectors, prompts, store, **kwargs),
    )


def is_adapter(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_tuned(spec: str, base: str, *, dtype: str = "auto", device: str | None = None) -> ChatModel:
    """A finetuned model: a full model as `load_model` takes it, or a LoRA adapter folder merged into `base`.

    A merged adapter is named after the base and a hash of the adapter's files, so cached activations follow the
    adapter's content rather than its folder name.
    """
    if not is_adapter(spec):
        return load_model(spec, dtype=dtype, device=device)
    from peft import PeftModel

    model = load_model(base, dtype=dtype, device=device)
    folder = Path(spec)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.name.startswith("adapter_") and p.is_file()):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    try:
        merged = PeftModel.from_pretrained(model.model, folder).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PersonaxisError(f"cannot apply the adapter {folder} to {base}: {first}") from None
    merged.eval()
    name = f"{model.name}+adapter:{digest.hexdigest()[:16]}"
    return ChatModel(model=merged, tokenizer=model.tokenizer, name=name, revision=model.revision)
