"""Find a model's decoder blocks without knowing its name.

Every causal LM in transformers keeps its decoder blocks in one `nn.ModuleList` whose length is the configured number
of hidden layers and whose children share one class. Searching for that shape (instead of keeping a table of attribute
paths per architecture) works for Llama, Qwen, Gemma, Mistral, GPT-2, GPT-NeoX, Phi, mixtures of experts and
models not yet written. When several lists qualify (a vision tower, experts inside a block), the one holding the
most parameters wins.
"""

from __future__ import annotations

from torch import nn

from personaxis.errors import PersonaxisError


def _n_layers_from_config(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, module list) of the decoder blocks."""
    expected = _n_layers_from_config(model)
    candidates: list[tuple[int, int, str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        candidates.append((_n_params(module), -path.count("."), path, module))
    if not candidates:
        raise PersonaxisError(
            f"cannot find the decoder blocks of {type(model).__name__}: no list of {expected or 'identical'} blocks"
        )
    _, _, path, blocks = max(candidates, key=lambda c: (c[0], c[1]))
    return path, blocks


def parent_of(model: nn.Module, path: str) -> nn.Module:
    """The module that owns the block list: it receives the attention mask and cache for every forward."""
    parent_path = path.rpartition(".")[0]
    return model.get_submodule(parent_path) if parent_path else model
