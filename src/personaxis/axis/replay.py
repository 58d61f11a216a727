"""Capped replay (science.md §2.7): the same user turns answered with and without a cap, each version on its own
history, and the per-turn projections on the axis read while the cap acts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from personaxis.axis.drift import turn_projections
from personaxis.axis.runfiles import axis_name, write_json
from personaxis.engine import Record, engine_for
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling, generate
from personaxis.inference.steering import cap_op
from personaxis.model.chat import Label
from personaxis.model.loading import ChatModel
from personaxis.vectors import CapConfig, Vectors


def capped_turn_projections(
    model: ChatModel, chat: Sequence[dict[str, str]], unit: torch.Tensor, layer: int, cap: CapConfig | None
) -> list[float | None]:
    """Like `drift.turn_projections`, but read while `cap` acts on the forward pass (the activations the capped
    model actually had). Without a cap it is exactly `turn_means` projected."""
    if cap is None:
        return turn_projections(model, chat, unit, layer)
    rendered = model.render(list(chat))
    assistant = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
    if not assistant:
        raise PersonaxisError("the conversation has no assistant turn")
    is_reply = rendered.mask(Label.ASSISTANT)
    weights = torch.stack([(is_reply & (rendered.message_index == i)).float() for i in assistant], dim=-1)
    ids = rendered.input_ids[None].to(model.device)
    with torch.inference_mode():
        ops = [cap_op(cap), Record("turns", [layer], weights=weights[None])]
        trace = engine_for(model).read(ops, input_ids=ids, attention_mask=torch.ones_like(ids))
    means = trace.means("turns")[0, :, 0]  # [turns, H], NaN for an empty turn
    values = (means.float() @ unit.float()).tolist()
    return [v if v == v else None for v in values]


def replay(
    model: ChatModel,
    chats: Sequence[Sequence[dict[str, str]]],
    cap: CapConfig,
    unit: torch.Tensor,
    layer: int,
    sampling: Sampling,
) -> list[dict[str, Any]]:
    """Regenerate every assistant turn of each chat twice, uncapped and capped, on the chat's own user turns.

    Each version keeps its own history (the capped model sees its own earlier capped replies); all chats and both
    versions advance together, one batch per turn.
    """
    op = cap_op(cap)
    scripts = []
    for i, chat in enumerate(chats):
        system = [dict(m) for m in chat[:1] if m["role"] == "system"]
        users = [m["content"] for m in chat if m["role"] == "user"]
        if not users:
            raise PersonaxisError(f"chat {i + 1} has no user turn to replay")
        scripts.append((system, users))
    histories = {(i, mode): [dict(m) for m in s[0]] for i, s in enumerate(scripts) for mode in ("uncapped", "capped")}
    for t in range(max(len(users) for _, users in scripts)):
        active = [(i, mode) for (i, mode) in histories if t < len(scripts[i][1])]
        for i, mode in active:
            histories[(i, mode)].append({"role": "user", "content": scripts[i][1][t]})
        outs = generate(
            model,
            [histories[a] for a in active],
            sampling,
            row_ops=[[op] if mode == "capped" else [] for _, mode in active],
        )
        for a, out in zip(active, outs, strict=True):
            histories[a].append({"role": "assistant", "content": out.text})
    results = []
    for i in range(len(scripts)):
        uncapped, capped = histories[(i, "uncapped")], histories[(i, "capped")]
        results.append(
            {
                "chat": i + 1,
                "uncapped": capped_turn_projections(model, uncapped, unit, layer, None),
                "capped": capped_turn_projections(model, capped, unit, layer, cap),
                "messages_uncapped": uncapped,
                "messages_capped": capped,
            }
        )
    return results


def replay_to(
    out: str | Path,
    model: ChatModel,
    chats: Sequence[Sequence[dict[str, str]]],
    cap: CapConfig,
    sampling: Sampling,
    *,
    axis: Vectors | None = None,
    layer: int | None = None,
    source: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """`replay` projected on `axis` (default: the cap's own direction) at `layer` (default: the axis's target layer,
    else the cap's first), written as JSON at `out` with its plot beside it (same name, .png); `source` names the
    cap config in the JSON. Returns the JSON's content and the plot's path."""
    from personaxis.axis.plots import replay_plot

    if axis is not None:
        layer = int(axis.meta.extra.get("target_layer", model.n_layers // 2)) if layer is None else layer
        unit = axis.unit(layer, axis_name(axis))
    else:
        floor = cap.as_floor()
        layer = floor.layers[0] if layer is None else layer
        unit = floor.unit(layer)
    results = replay(model, chats, cap, unit, layer, sampling)
    data = {"model": model.name, "config": source, "layer": layer, "chats": results}
    path = write_json(out, data)
    return data, replay_plot(path.with_suffix(".png"), results, layer)
