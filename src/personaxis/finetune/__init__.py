"""Finetuning with persona vectors: LoRA training with preventative steering or ablation, and the finetuning shift.

The names below load on first use, so that importing the package does not pull in torch and PEFT.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FinetuneResult": "train",
    "TrainConfig": "train",
    "build_examples": "train",
    "finetune": "train",
    "loss_mask": "train",
    "Shift": "shift",
    "finetune_shift": "shift",
    "last_prompt_projection": "shift",
    "load_tuned": "shift",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'personaxis.finetune' has no attribute {name!r}")
    return getattr(import_module(f"personaxis.finetune.{_EXPORTS[name]}"), name)
