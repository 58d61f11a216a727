"""Load any causal chat model into one handle that the rest of personaxis works with."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from personaxis.errors import PersonaxisError
from personaxis.model.attention import supports_rowwise
from personaxis.model.blocks import find_blocks, parent_of
from personaxis.model.chat import TokenizerChat
from personaxis.model.embedded import fetch_embedded, resolve_embedded

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(eq=False)
class ChatModel(TokenizerChat):
    """A causal LM, its tokenizer, and where its decoder blocks are. One `Engine` per model holds all hooks."""

    model: nn.Module
    tokenizer: Any
    name: str
    revision: str | None = None
    blocks_path: str = ""
    blocks: nn.ModuleList = field(default=None, repr=False)  # type: ignore[assignment]
    runtime: ClassVar[str] = "hf"  # which runtime generates (`personaxis.vllm.VLLMModel` says "vllm")

    def __post_init__(self) -> None:
        if self.blocks is None:
            self.blocks_path, self.blocks = find_blocks(self.model)
        if self.tokenizer is not None and getattr(self.tokenizer, "pad_token_id", None) is None:
            # batching needs a pad id; which one does not matter since padded positions are masked out
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    @property
    def config(self) -> Any:
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        for attr in ("hidden_size", "n_embd", "d_model"):
            if isinstance(getattr(self.config, attr, None), int):
                return getattr(self.config, attr)
        raise PersonaxisError(f"cannot tell the hidden size of {self.name}")

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", "unknown"))

    @property
    def base(self) -> nn.Module:
        """The module that owns the blocks and receives the attention mask on every forward."""
        return parent_of(self.model, self.blocks_path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def batch_invariant(self) -> bool:
        """Whether decoding is batch-invariant by default (`model.attention`): on a CPU, where it makes bf16 exact,
        for models that can run row-wise attention."""
        return self.device.type == "cpu" and supports_rowwise(self.config)

    @property
    def generation_config(self) -> Any:
        return getattr(self.model, "generation_config", None)

    def block_device(self, layer: int) -> torch.device:
        return next(self.blocks[layer].parameters()).device


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PersonaxisError(f"unknown dtype '{dtype}' (choose from {', '.join(sorted(DTYPES))}, auto)")
    return DTYPES[dtype]


def wrap_model(model: nn.Module | ChatModel, tokenizer: Any = None) -> ChatModel:
    """A `ChatModel` around a Hugging Face model loaded elsewhere (a `ChatModel` is returned as it is). Ops and
    readouts need no tokenizer; chats and generation do. The model is not changed: hooks live only inside `apply`."""
    if isinstance(model, ChatModel):
        return model
    if not isinstance(model, nn.Module):
        raise PersonaxisError(f"expected a model spec or a torch model, got {type(model).__name__}")
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    return ChatModel(model=model, tokenizer=tokenizer, name=name)


def load_model(
    spec: str | os.PathLike | nn.Module,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> ChatModel:
    """Load a model from a hub id, a local folder, a `.gguf` file, or an embedded name (`default`, ...); or take one
    already loaded (a Hugging Face causal LM, with its `tokenizer`) as it is (`wrap_model`).

    `device_map="auto"` spreads a large model over several GPUs; hooks then move vectors to each block's device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(spec, (str, os.PathLike)):
        return wrap_model(spec, tokenizer)
    spec = str(spec)
    name = model_name(spec)
    kwargs: dict[str, Any] = {"dtype": _dtype(dtype), "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    source: str | Path = spec
    embedded = resolve_embedded(spec)
    path = Path(spec).expanduser()
    if embedded is not None and not path.exists():
        source = fetch_embedded(embedded)
        if kwargs["dtype"] == "auto":
            kwargs["dtype"] = torch.bfloat16 if (device or "cpu") == "cpu" else "auto"
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise PersonaxisError(f"no GGUF file at {path}")
        _check_gguf(path)
        source, kwargs["gguf_file"] = path.parent, path.name
    elif path.exists():
        if not (path / "config.json").exists():
            raise PersonaxisError(f"{path} is not a model folder (no config.json)")
        source = path
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PersonaxisError(f"no model at {spec}")
    else:
        kwargs["revision"] = revision
        if not _in_hub_cache(spec, revision) and not _hub_reachable():
            raise PersonaxisError(
                f"cannot load model '{spec}': not a local path, not cached, and the model hub is unreachable"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_tok_kwargs(kwargs))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise PersonaxisError(f"cannot load model '{spec}': {_first_line(exc)}") from None
    except Exception as exc:
        if "gguf_file" not in kwargs:
            raise
        # transformers' GGUF reader raises ValueError, KeyError, struct.error... on a file it cannot convert
        raise PersonaxisError(f"cannot load GGUF model {spec}: {_first_line(exc)}") from None
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    return ChatModel(model=model, tokenizer=tokenizer, name=name, revision=revision)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_gguf(path: Path) -> None:
    """Refuse, in one line, a `.gguf` that transformers could only answer with a traceback: not a GGUF file, a
    llama.cpp control vector rather than a model, or a model without the tokenizer that transformers rebuilds."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # transformers says that it needs the gguf package
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise PersonaxisError(f"cannot read {path}: {exc.strerror or _first_line(exc)}") from None
    if magic != b"GGUF":
        raise PersonaxisError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
        field = reader.fields.get("general.architecture")
        arch, has_tokenizer = (field.contents() if field else None), "tokenizer.ggml.model" in reader.fields
        del reader  # release the memory map
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on a damaged file
        raise PersonaxisError(
            f"{path} is not a readable GGUF file (damaged or truncated?): {_first_line(exc)}"
        ) from None
    if arch == "controlvector":
        raise PersonaxisError(f"{path} is a llama.cpp control vector, not a model")
    if arch is None:
        raise PersonaxisError(f"{path} is not a GGUF model: it names no architecture (general.architecture)")
    if not has_tokenizer:
        raise PersonaxisError(
            f"{path} holds no tokenizer (no tokenizer.ggml.* metadata), which transformers needs to load a GGUF model"
        )


def model_name(spec: str | os.PathLike) -> str:
    """The name `load_model(spec)` gives the model (an embedded model's own name, else the spec), without loading."""
    spec = str(spec)
    embedded = resolve_embedded(spec)
    return embedded.name if embedded is not None and not Path(spec).expanduser().exists() else spec


def _tok_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in ("gguf_file", "revision", "trust_remote_code")}


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt: an offline machine fails in seconds, not after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
