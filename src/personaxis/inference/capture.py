"""Activation means over token spans of finished chats, in batched forward passes that keep no activations.

Aggregations are relative to the chat's last assistant message, the reply being studied:
- "response": its content tokens (no template tokens, no end-of-turn token, no thinking block);
- "prompt": every token before its content starts (system, user and template tokens);
- "last_prompt": the single token just before its content (where the model decides how to answer);
- "turns": one mean per assistant message, for drift along a conversation (see `turn_means`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from personaxis.common.progress import progress_bar
from personaxis.engine import Record, engine_for
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import left_pad, position_ids
from personaxis.model.chat import Label, RenderedChat
from personaxis.model.loading import ChatModel

AGGREGATIONS = ("response", "prompt", "last_prompt")


def _weights(chat: RenderedChat, aggregations: Sequence[str], where: str) -> torch.Tensor:
    """[S, A] 0/1 weights of each aggregation for one rendered chat."""
    assistant = chat.mask(Label.ASSISTANT)
    if not assistant.any():
        raise PersonaxisError(f"{where}: the chat has no assistant turn with content")
    last = int(chat.message_index[assistant].max())
    response = assistant & (chat.message_index == last)
    first = int(response.nonzero()[0])
    weights = torch.zeros(len(chat), len(aggregations))
    for a, name in enumerate(aggregations):
        if name == "response":
            weights[:, a] = response.float()
        elif name == "prompt":
            weights[:first, a] = 1
        elif name == "last_prompt":
            if first == 0:
                raise PersonaxisError(f"{where}: the reply has no prompt before it")
            weights[first - 1, a] = 1
        else:
            raise PersonaxisError(f"unknown aggregation {name!r} (choose from {', '.join(AGGREGATIONS)})")
    return weights


def _batched_means(
    model: ChatModel, chats: Sequence[RenderedChat], weights: Sequence[torch.Tensor], layers: Sequence[int]
) -> torch.Tensor:
    """Run one left-padded batch and return its [B, K, L, H] means, still on the model's device."""
    ids, mask = left_pad([chat.input_ids for chat in chats], model.tokenizer.pad_token_id)
    batch, width = ids.shape
    w = torch.zeros(batch, width, weights[0].shape[-1])
    for b, (chat, weight) in enumerate(zip(chats, weights, strict=True)):
        w[b, width - len(chat) :] = weight
    device = model.device
    with torch.inference_mode():
        trace = engine_for(model).read(
            [Record("means", layers, weights=w)],
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids(mask).to(device),
        )  # fmt: skip
    return trace.means("means", on_device=True)


def _to_host(means: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying to host memory without waiting; the event says when the copy is done."""
    if means.device.type != "cuda":
        return means, None
    host = torch.empty(means.shape, dtype=means.dtype, pin_memory=True)
    host.copy_(means, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def iter_means(
    model: ChatModel,
    chats: Sequence[Sequence[dict[str, str]] | RenderedChat],
    layers: Sequence[int],
    aggregations: Sequence[str] = ("response",),
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (chat indices, [b, A, L, H] means) batch by batch, so callers can reduce without holding everything.

    Chats may come already rendered (`model.render`), so that a pipeline tokenizes each chat once.
    """
    rendered = [chat if isinstance(chat, RenderedChat) else model.render(list(chat)) for chat in chats]
    weights = [_weights(chat, aggregations, f"chat {i + 1}") for i, chat in enumerate(rendered)]
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]), reverse=True)  # as `runs.longest_first`
    with progress_bar(progress, transient=True) as bar:
        task = bar.add_task("capturing", total=len(order))
        # On a GPU, batch i + 1 is queued before batch i's results are awaited, so the device never idles while the
        # host prepares the next batch; on a CPU this is plain sequential work.
        previous: tuple[list[int], torch.Tensor, torch.cuda.Event | None] | None = None
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            means = _batched_means(model, [rendered[i] for i in chunk], [weights[i] for i in chunk], layers)
            current = (chunk, *_to_host(means))
            if previous is not None:
                yield _ready(previous)
                bar.advance(task, len(previous[0]))
            previous = current
        if previous is not None:
            yield _ready(previous)
            bar.advance(task, len(previous[0]))


def _ready(item: tuple[list[int], torch.Tensor, torch.cuda.Event | None]) -> tuple[list[int], torch.Tensor]:
    chunk, means, event = item
    if event is not None:
        event.synchronize()
    return chunk, means


def encode_means(
    model: ChatModel,
    chats: Sequence[Sequence[dict[str, str]] | RenderedChat],
    layers: Sequence[int],
    aggregations: Sequence[str] = ("response",),
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """[N, A, L, H] float32 means of each chat's spans, in the order given."""
    out = torch.empty(len(chats), len(aggregations), len(layers), model.hidden_size)
    for chunk, means in iter_means(model, chats, layers, aggregations, batch_size=batch_size, progress=progress):
        out[chunk] = means
    return out


def turn_means(model: ChatModel, chat: Sequence[dict[str, str]], layers: Sequence[int]) -> torch.Tensor:
    """[n_assistant_turns, L, H]: the mean over each assistant message's content tokens, in one forward pass."""
    rendered = model.render(list(chat))
    turns = rendered.assistant_turn
    n_turns = int(turns.max()) + 1
    if n_turns == 0:
        raise PersonaxisError("the conversation has no assistant turn with content")
    weights = torch.zeros(len(rendered), n_turns)
    for k in range(n_turns):
        weights[:, k] = (turns == k).float()
    return _batched_means(model, [rendered], [weights], layers)[0].cpu()


def residual_norms(
    model: ChatModel, texts: Sequence[str], layers: Sequence[int] | None = None, batch_size: int = 8
) -> dict[int, float]:
    """Mean L2 norm of the residual per layer over neutral texts (the unit of relative steering).

    The first token of each text is left out: it is an attention sink whose norm can be a hundred times the others.
    """
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    total = torch.zeros(len(layers))
    count = 0.0
    for start in range(0, len(texts), batch_size):
        encoded = model.tokenizer(list(texts[start : start + batch_size]), add_special_tokens=False)["input_ids"]
        ids, mask = left_pad(encoded, model.tokenizer.pad_token_id)
        width = ids.shape[1]
        weights = mask.float()
        weights[torch.arange(len(encoded)), width - torch.tensor([len(e) for e in encoded])] = 0
        record = Record("norms", layers, weights=weights[..., None], stat="norm")
        with torch.inference_mode():
            trace = engine_for(model).read(
                [record], input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                position_ids=position_ids(mask).to(model.device),
            )  # fmt: skip
        counts = trace.counts("norms")[:, 0]
        total += (trace.means("norms")[:, 0] * counts[:, None]).sum(dim=0)
        count += float(counts.sum())
    return {layer: float(total[j] / count) for j, layer in enumerate(layers)}
