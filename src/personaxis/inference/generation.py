"""Batched generation with engine ops, and activation capture in the same pass.

The decode loop is written out (prefill, then one token per step under a KV cache) instead of calling `generate()`,
because it must do three things `generate()` does not: per-row sampling settings and seeds (so a sample's text does not
depend on its batch), stopping each row at its own end-of-turn token without feeding that token back, and one extra
forward for rows stopped by the length limit so their last token's activation is captured too. Together these make
the response-token means recorded while generating equal those of re-encoding the finished chat.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import torch

from personaxis.common.progress import progress_bar
from personaxis.engine import Op, Project, Record, Trace, engine_for
from personaxis.errors import PersonaxisError
from personaxis.model.attention import rowwise, supports_rowwise
from personaxis.model.cache import cache_argument, returned_cache
from personaxis.model.chat import Label
from personaxis.model.loading import ChatModel

CAPTURES = ("response", "prompt", "last_prompt")
GREEDY_BELOW = 1e-5  # a temperature this low decodes greedily (as vLLM does): logits / T would overflow to inf


@dataclass(frozen=True)
class Sampling:
    """Per-row sampling settings; temperature 0 (or below `GREEDY_BELOW`) means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 1_000_000:
            raise PersonaxisError("max_new_tokens must be a positive integer")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise PersonaxisError("temperature must be a finite number ≥ 0")
        if not 0 < self.top_p <= 1:
            raise PersonaxisError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class Generation:
    """One reply: its tokens and text, why it stopped, and what was read out while it was generated."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    means: dict[str, torch.Tensor] = field(default_factory=dict)  # capture name -> [L, H] float32
    projections: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n_tokens, L], per reply token
    cap_hits: int = 0


def stop_token_ids(model: ChatModel) -> set[int]:  # or any handle with a tokenizer, render and generation_config
    """End-of-turn ids: the eos ids the model declares plus the token its template puts right after a reply."""
    ids: set[int] = set()
    for source in (model.generation_config, model.tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if model.has_chat_template:
        chat = model.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}])
        positions = (chat.labels == int(Label.ASSISTANT)).nonzero().flatten()
        if len(positions) and int(positions[-1]) + 1 < len(chat):
            after = int(chat.input_ids[int(positions[-1]) + 1])
            if after in set(model.tokenizer.all_special_ids):
                ids.add(after)
    return ids


def prompt_ids(model: ChatModel, messages: Sequence[dict[str, str]]) -> list[int]:
    """The token ids the model reads before it starts its reply."""
    return model.render(list(messages), add_generation_prompt=True).input_ids.tolist()


def sample_next(
    logits: torch.Tensor, settings: Sequence[Sampling], generators: Sequence[torch.Generator | None], active: list[bool]
) -> list[int | None]:
    """Next token of every active row, with one device-to-host transfer for the whole batch."""
    rows = [b for b in range(len(active)) if active[b]]
    greedy = [b for b in rows if settings[b].greedy]
    sampled = [b for b in rows if not settings[b].greedy]
    out: list[int | None] = [None] * len(active)
    if greedy:
        for b, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True):
            out[b] = token
    if sampled:
        temperatures = torch.tensor([settings[b].temperature for b in sampled], device=logits.device)
        probs = torch.softmax(logits[sampled].float() / temperatures[:, None], dim=-1).cpu()
        for row, b in enumerate(sampled):
            p = probs[row]
            if settings[b].top_p < 1:
                sorted_probs, order = p.sort(descending=True)
                sorted_probs[sorted_probs.cumsum(0) - sorted_probs > settings[b].top_p] = 0
                p = torch.zeros_like(p).scatter_(0, order, sorted_probs)
            out[b] = int(torch.multinomial(p, 1, generator=generators[b]))
    return out


def check_request(
    prompts: Sequence[list[int]], sampling: Sampling | Sequence[Sampling], captures: Sequence[str]
) -> list[Sampling]:
    """Refuse an empty prompt, an unknown capture or a sampling list of the wrong length; one setting per prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PersonaxisError("every prompt needs at least one token")
    bad = [c for c in captures if c not in CAPTURES]
    if bad:
        raise PersonaxisError(f"unknown capture {bad[0]!r} (choose from {', '.join(CAPTURES)})")
    settings = list(sampling) if isinstance(sampling, Sequence) else [sampling] * len(prompts)
    if len(settings) != len(prompts):
        raise PersonaxisError("give one sampling setting per prompt")
    return settings


def accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def generate_batch(
    model: ChatModel,
    prompts: Sequence[list[int]],
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    *,
    ops: Sequence[Op] = (),
    capture_layers: Sequence[int] | None = None,
    captures: Sequence[str] = ("response",),
    on_token: Callable[[int, int, dict[str, torch.Tensor]], bool | None] | None = None,
    invariant: bool | None = None,
) -> list[Generation]:
    """Generate replies for one batch of prompts (token ids), applying `ops` (their `rows` index this batch).

    `on_token(row, token_id, projections)` is called for every reply token, with that token's projections
    ({name: [L]}) when `Project` ops are present (then it comes one step later, once the token has been run);
    returning False stops that row (e.g. the client disconnected).

    `invariant` (default `model.batch_invariant`: on a CPU) makes each row's tokens independent of the batch it runs
    in, bf16 included, so that sampling with a seed gives the same reply whatever else is generated with it: the
    model attends row by row for the call (`model.attention`), and a lone prompt never goes through a one-row matmul
    (`Engine.paired_single_rows`).
    """
    settings = check_request(prompts, sampling, captures)
    if invariant is None:
        invariant = model.batch_invariant
    elif invariant and not supports_rowwise(model.config):
        raise PersonaxisError(f"{model.name} uses sliding windows or soft-capping: batch-invariant decoding cannot run")
    device = model.device
    pad = model.tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)
    batch, width = ids.shape
    ops = list(ops)
    if capture_layers:
        weights = torch.zeros(batch, width, len(CAPTURES))
        weights[:, :, 1] = mask  # prompt mean
        weights[:, -1, 2] = 1  # last prompt token (left padding puts it last for every row)
        ops.append(Record("capture", capture_layers, weights=weights, generated=torch.tensor([1.0, 0.0, 0.0])))
    projected = [op.name for op in ops if isinstance(op, Project)]
    readouts = bool(capture_layers or projected)
    generators = [
        torch.Generator().manual_seed(s.seed) if s.seed is not None and not s.greedy else None for s in settings
    ]
    stops = stop_token_ids(model)
    extra = {"logits_to_keep": 1} if accepts(model.model, "logits_to_keep") else {}
    cache_name = cache_argument(model.model) or "past_key_values"
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finish: list[str] = [""] * batch
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode(), _invariance(model, invariant, batch), engine_for(model).apply(ops) as trace:
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, **extra)
        cache, logits = returned_cache(out), out.logits[:, -1]
        next_position = mask.sum(dim=1)
        active = [True] * batch
        while True:
            sampled = sample_next(logits, settings, generators, active)
            early = on_token if not projected else None  # with projections, a token is reported once it has run
            feed, step_ids = _take(sampled, tokens, finish, active, settings, stops, pad, early)
            if not any(active) and not (readouts and feed.any()):
                break
            feed, step_ids = feed.to(device), step_ids.to(device)
            mask = torch.cat([mask, feed[:, None]], dim=1)
            out = model.model(
                input_ids=step_ids[:, None],
                attention_mask=mask,
                position_ids=next_position[:, None],
                use_cache=True,
                **{cache_name: cache},
                **extra,
            )
            cache, logits = returned_cache(out), out.logits[:, -1]
            next_position = next_position + feed
            if on_token is not None and projected:
                latest = {name: trace.latest(name) for name in projected}
                for b in feed.nonzero().flatten().tolist():
                    if on_token(b, tokens[b][-1], {n: v[b] for n, v in latest.items()}) is False and active[b]:
                        finish[b], active[b] = "stop", False
            if not any(active):
                break
    return _collect(model, prompts, tokens, finish, trace, width, capture_layers, captures, ops)


def _take(
    sampled: Sequence[int | None],
    tokens: list[list[int]],
    finish: list[str],
    active: list[bool],
    settings: Sequence[Sampling],
    stops: set[int],
    pad: int,
    on_token: Callable[[int, int, dict[str, torch.Tensor]], bool | None] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append each row's sampled token to its reply, ending rows that stop or reach their budget; returns which rows
    feed a token into the next step ([B] 0/1) and the tokens they feed ([B], padding elsewhere)."""
    feed = torch.zeros(len(sampled), dtype=torch.long)
    step_ids = torch.full((len(sampled),), pad, dtype=torch.long)
    for b, token in enumerate(sampled):
        if token is None:
            continue
        if token in stops:
            finish[b], active[b] = "stop", False
            continue
        tokens[b].append(token)
        feed[b], step_ids[b] = 1, token
        if len(tokens[b]) >= settings[b].max_new_tokens:
            finish[b], active[b] = "length", False
        if on_token is not None and on_token(b, token, {}) is False:
            finish[b], active[b] = "stop", False
    return feed, step_ids


def left_pad(rows: Sequence[Sequence[int] | torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-aligned in one batch: ids [B, W] (`pad` before each row) and the attention mask [B, W]."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
        mask[b, width - len(row) :] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (padding gets 0 too)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _invariance(model: ChatModel, invariant: bool, batch: int) -> ExitStack:
    """Row-wise attention, and for a lone row no one-row matmuls (see `generate_batch`)."""
    stack = ExitStack()
    if invariant:
        stack.enter_context(rowwise(model.model))
        if batch == 1:
            stack.enter_context(engine_for(model).paired_single_rows())
    return stack


def _collect(
    model: ChatModel,
    prompts: Sequence[list[int]],
    tokens: list[list[int]],
    finish: list[str],
    trace: Trace,
    width: int,
    capture_layers: Sequence[int] | None,
    captures: Sequence[str],
    ops: Sequence[Op],
) -> list[Generation]:
    means = trace.means("capture") if capture_layers else None  # [B, 3, L, H]
    projections = {op.name: trace.projections(op.name) for op in ops if isinstance(op, Project)}
    results = []
    for b, prompt in enumerate(prompts):
        generation = Generation(
            prompt_ids=list(prompt),
            token_ids=tokens[b],
            text=model.tokenizer.decode(tokens[b], skip_special_tokens=True),
            finish_reason=finish[b],
            cap_hits=int(trace.cap_hits[b]) if trace.cap_hits is not None else 0,
        )
        if means is not None:
            generation.means = {name: means[b, CAPTURES.index(name)] for name in captures}
        for name, values in projections.items():
            generation.projections[name] = values[b, width : width + len(tokens[b])]
        results.append(generation)
    return results


def generate(
    model: ChatModel,
    chats: Sequence[Sequence[dict[str, str]]],
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    *,
    ops: Sequence[Op] = (),
    row_ops: Sequence[Sequence[Op]] | None = None,
    capture_layers: Sequence[int] | None = None,
    captures: Sequence[str] = ("response",),
    batch_size: int = 8,
    progress: bool = False,
    invariant: bool | None = None,
) -> list[Generation]:
    """Reply to many chats in batches (similar lengths together); `row_ops[i]` adds ops for chat i only.

    `invariant`: see `generate_batch` (on a CPU a chat's reply is the same whatever chats it is batched with)."""
    prompts = [prompt_ids(model, chat) for chat in chats]
    settings = list(sampling) if isinstance(sampling, Sequence) else [sampling] * len(prompts)
    if row_ops is not None and len(row_ops) != len(prompts):
        raise PersonaxisError("row_ops needs one list of ops per chat")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    with progress_bar(progress, transient=True) as bar:
        task = bar.add_task("generating", total=len(prompts))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch_ops = list(ops)
            if row_ops is not None:
                batch_ops += rows_for(chunk, row_ops)
            outputs = generate_batch(
                model,
                [prompts[i] for i in chunk],
                [settings[i] for i in chunk],
                ops=batch_ops,
                capture_layers=capture_layers,
                captures=captures,
                invariant=invariant,
            )
            for i, output in zip(chunk, outputs, strict=True):
                results[i] = output
            bar.advance(task, len(chunk))
    return results  # type: ignore[return-value]


def rows_for(chunk: Sequence[int], row_ops: Sequence[Sequence[Op]]) -> list[Op]:
    """Turn per-chat ops into ops of one batch: the same op object on several chats becomes one op on several rows."""
    rows: dict[int, tuple[Op, list[int]]] = {}
    for row, index in enumerate(chunk):
        for op in row_ops[index]:
            rows.setdefault(id(op), (op, []))[1].append(row)
    return [replace(op, rows=tuple(r)) for op, r in rows.values()]
