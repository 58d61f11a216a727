"""LoRA finetuning on chats, optionally with preventative steering or ablation active while it trains.

Preventative steering (Chen et al. 2025) adds α·v at every position of chosen layers *during* training only: the
optimizer then has no reason to move the model along v, since the data's pull in that direction is already supplied
by the hook; once the hook is removed the tuned model has acquired less of the trait. The ablation variant (as in CAFT)
removes the direction from the residual stream during training instead. Both are engine ops held by
`engine_for(model).apply` around the training loop, so nothing of them remains after it.

The loop is a small one written over PEFT rather than a trainer framework: the loss mask comes from the chat
renderer's token labels (every assistant message's content and the end-of-turn token that closes it, so the model
still learns to stop), gradients accumulate over token counts rather than batch counts, and nothing touches the
caller's model configuration, tokenizer or the hooks the engine owns.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from personaxis import __version__
from personaxis.common.progress import progress_bar
from personaxis.engine import Op, engine_for
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import stop_token_ids
from personaxis.model import ChatModel, Label, RenderedChat
from personaxis.store import atomic_dir, atomic_write_text, canonical_json

CONFIG_FILE = "personaxis_finetune.json"
IGNORE = -100  # label of tokens outside the loss, as transformers' losses expect


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters. The defaults follow common LoRA practice (the paper used rank 32, alpha 64, all linear)."""

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    lora_r: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    max_length: int = 1024
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "grad_accum", "lora_r", "max_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PersonaxisError(f"{name} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PersonaxisError(f"the learning rate must be a positive number, got {self.lr}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise PersonaxisError("lora_dropout and warmup_ratio must be in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise PersonaxisError("max_steps must be a positive integer")


@dataclass
class Example:
    input_ids: torch.Tensor  # [S]
    labels: torch.Tensor  # [S], IGNORE outside the loss


@dataclass
class FinetuneResult:
    adapter_dir: Path
    losses: list[float]  # one per optimizer step: mean token loss of that step's batches
    n_examples: int
    n_loss_tokens: int
    config: dict[str, Any] = field(repr=False)


def loss_mask(chat: RenderedChat, stops: set[int]) -> torch.Tensor:
    """[S] bool: the content tokens of every assistant message plus the end-of-turn token right after each."""
    mask = chat.mask(Label.ASSISTANT)
    last = mask & ~torch.cat([mask[1:], torch.zeros(1, dtype=torch.bool)])  # last token of each reply
    for position in (last.nonzero().flatten() + 1).tolist():
        if position < len(chat) and int(chat.input_ids[position]) in stops:
            mask[position] = True
    return mask


def build_examples(model: ChatModel, chats: Sequence[Sequence[dict[str, str]]], max_length: int) -> list[Example]:
    """Render and label every chat; a chat whose replies fall past `max_length` tokens contributes nothing."""
    stops = stop_token_ids(model)
    examples = []
    for chat in chats:
        rendered = model.render(list(chat), include_thinking=True)
        mask = loss_mask(rendered, stops)[:max_length]
        ids = rendered.input_ids[:max_length]
        if mask[1:].any():  # the first token is never predicted
            examples.append(Example(ids, torch.where(mask, ids, torch.full_like(ids, IGNORE))))
    if not examples:
        raise PersonaxisError("no chat has assistant tokens to train on (within max_length)")
    return examples


def batch_loss(model: torch.nn.Module, batch: Sequence[Example], pad_id: int, device: torch.device) -> torch.Tensor:
    """Sum over the batch's loss tokens of −log p(token | prefix), in float32 (right padding, masked)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for b, example in enumerate(batch):
        n = len(example.input_ids)
        ids[b, :n], labels[b, :n], attention[b, :n] = example.input_ids, example.labels, 1
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
    predicted = logits[:, :-1].flatten(0, 1).float()
    return F.cross_entropy(predicted, labels[:, 1:].flatten().to(device), ignore_index=IGNORE, reduction="sum")


def _n_targets(batch: Sequence[Example]) -> int:
    return sum(int((e.labels[1:] != IGNORE).sum()) for e in batch)


def _groups(examples: list[Example], config: TrainConfig, generator: torch.Generator) -> Iterator[list[list[Example]]]:
    """Optimizer steps, each a list of micro-batches, epoch after epoch in a fresh seeded order."""
    for _ in range(config.epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        size = config.batch_size
        batches = [[examples[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
        for start in range(0, len(batches), config.grad_accum):
            yield batches[start : start + config.grad_accum]


def n_steps(n_examples: int, config: TrainConfig) -> int:
    per_epoch = math.ceil(math.ceil(n_examples / config.batch_size) / config.grad_accum)
    total = per_epoch * config.epochs
    return min(total, config.max_steps) if config.max_steps else total


def check_adapter_dir(path: Path) -> Path:
    """The adapter folder must be new or empty, so a run never mixes its files with an older adapter's."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PersonaxisError(f"{path} exists and is not an empty folder; choose a new adapter folder")
    parent = path.expanduser().absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PersonaxisError(f"cannot create {path}: {parent} is not a writable folder")
    return path


def chats_hash(chats: Sequence[Sequence[dict[str, str]]]) -> str:
    return hashlib.sha256(canonical_json([list(c) for c in chats]).encode()).hexdigest()


def finetune(
    model: ChatModel,
    chats: Sequence[Sequence[dict[str, str]]],
    out: str | os.PathLike[str],
    config: TrainConfig = TrainConfig(),
    *,
    ops: Sequence[Op] = (),
    notes: dict[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Train a LoRA adapter on `chats` with `ops` held on the model while it trains; save it and its config to `out`.

    The model keeps the trained adapter afterwards (PEFT injects it into the model's own modules), without any hook.
    `notes` (e.g. which vectors steered and how) go into the saved config; `on_step(step, loss)` runs after each step.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    out = check_adapter_dir(Path(out))
    examples = build_examples(model, chats, config.max_length)
    total = n_steps(len(examples), config)
    torch.manual_seed(config.seed)  # the adapter's initial weights
    target = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=target, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model.model, lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(config.seed)
    pad_id, device = model.tokenizer.pad_token_id, model.device
    losses: list[float] = []

    peft_model.train()
    try:
        with engine_for(model).apply(list(ops)), progress_bar(progress, transient=True) as bar:
            task = bar.add_task("training", total=total)
            for step, group in enumerate(_groups(examples, config, generator), start=1):
                n = sum(_n_targets(batch) for batch in group)
                step_loss = 0.0
                for batch in group:
                    loss = batch_loss(peft_model, batch, pad_id, device) / n
                    loss.backward()
                    step_loss += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
                bar.update(task, advance=1, description=f"training (loss {step_loss:.3f})")
                if on_step is not None:
                    on_step(step, step_loss)
                if step >= total:
                    break
    finally:
        peft_model.eval()

    record = {
        "format": 1,
        "library_version": __version__,
        "base_model": model.name,
        "base_revision": model.revision,
        "dtype": str(model.dtype),
        "data": {
            "sha256": chats_hash(chats),
            "chats": len(chats),
            "examples": len(examples),
            "loss_tokens": sum(_n_targets([e]) for e in examples),
        },  # fmt: skip
        "training": {**asdict(config), "steps": len(losses)},
        "intervention": None,
        "losses": losses,
        **(notes or {}),
    }
    _save(peft_model, out, record)
    return FinetuneResult(out, losses, len(examples), record["data"]["loss_tokens"], record)


def _save(peft_model: torch.nn.Module, out: Path, record: dict[str, Any]) -> None:
    """Write the adapter and its config into a temporary sibling folder and move it into place whole."""
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(tmp)
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(record, indent=2, default=str) + "\n")
