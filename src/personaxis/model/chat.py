"""Render chats with the model's own template and label every token.

The template string is rendered once, each message's text is located in it in order, and the tokenizer's character
offsets turn those character spans into per-token labels. Nothing depends on model names: whatever special tokens a
template wraps around a message stay outside the spans and are labelled TEMPLATE.

Templates without a system role (Gemma 2 raises, others drop it) get the system text folded into the first user turn,
as those models' own documentation advises; the folded text keeps the SYSTEM label and `RenderedChat.system_folded`
says it happened. Tokenizers without any template (base models) use a plain "System:/User:/Assistant:" transcript,
reported by `RenderedChat.template == "fallback"`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from personaxis.errors import PersonaxisError

ROLES = ("system", "user", "assistant")
FALLBACK_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


class Label(IntEnum):
    TEMPLATE = 0
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3
    THINKING = 4


_LABEL_OF_ROLE = {"system": Label.SYSTEM, "user": Label.USER, "assistant": Label.ASSISTANT}


@dataclass
class RenderedChat:
    """Token ids of a chat plus, for every token, what it is and which message it belongs to."""

    input_ids: torch.Tensor  # [S] long
    labels: torch.Tensor  # [S] int8, a `Label`
    message_index: torch.Tensor  # [S] long, index into the messages, -1 for template tokens
    text: str
    template: str  # "model" or "fallback"
    system_folded: bool
    n_messages: int

    def mask(self, label: Label) -> torch.Tensor:
        return self.labels == int(label)

    @property
    def assistant_turn(self) -> torch.Tensor:
        """[S] long: 0, 1, 2... for the content tokens of successive assistant messages, -1 elsewhere."""
        turn = torch.full_like(self.message_index, -1)
        is_assistant = self.mask(Label.ASSISTANT)
        for k, index in enumerate(torch.unique(self.message_index[is_assistant]).tolist()):
            turn[is_assistant & (self.message_index == index)] = k
        return turn

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def normalize_messages(messages: Any, where: str = "chat") -> list[dict[str, str]]:
    """Check a list of {role, content} messages and return plain dicts; a clear error names what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise PersonaxisError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise PersonaxisError(f"{where}: message {i} needs a role among {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise PersonaxisError(f"{where}: message {i} ({message['role']}) needs a string 'content'")
        out.append({"role": message["role"], "content": content})
    return out


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_SYSTEM_SUPPORT: dict[str, bool] = {}


def supports_system(tokenizer: Any) -> bool:
    """Whether the template renders a system message (False for templates that raise on it or drop it)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return True
    if template not in _SYSTEM_SUPPORT:
        probe = [{"role": "system", "content": "PXSYSPROBE"}, {"role": "user", "content": "PXUSERPROBE"}]
        try:
            _SYSTEM_SUPPORT[template] = "PXSYSPROBE" in tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:
            _SYSTEM_SUPPORT[template] = False
    return _SYSTEM_SUPPORT[template]


Piece = tuple[str, Label, int]  # text, label, index of the caller's message it came from


def _fold_system(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[Piece]]:
    """Move a leading system message into the first user turn; return the messages to render and labelled pieces."""
    system, rest = messages[0]["content"], messages[1:]
    folded: list[dict[str, str]] = []
    pieces: list[Piece] = []
    for index, message in enumerate(rest, start=1):
        if message["role"] == "user" and not any(label == Label.SYSTEM for _, label, _ in pieces):
            folded.append({"role": "user", "content": f"{system}\n\n{message['content']}"})
            pieces += [(system, Label.SYSTEM, 0), (message["content"], Label.USER, index)]
        else:
            folded.append(message)
            pieces.append((message["content"], _LABEL_OF_ROLE[message["role"]], index))
    if not any(label == Label.SYSTEM for _, label, _ in pieces):  # no user turn: the system text stands alone
        folded.insert(0, {"role": "user", "content": system})
        pieces.insert(0, (system, Label.SYSTEM, 0))
    return folded, pieces


def _fallback_text(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"{FALLBACK_HEADERS[m['role']]}{m['content']}\n\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    include_thinking: bool = False,
) -> RenderedChat:
    """Render `messages` as the model sees them and label each token (system, user, assistant, template)."""
    messages = normalize_messages(messages)
    folded = messages[0]["role"] == "system" and has_chat_template(tokenizer) and not supports_system(tokenizer)
    if folded:
        rendered_messages, pieces = _fold_system(messages)
    else:
        rendered_messages = messages
        pieces = [(m["content"], _LABEL_OF_ROLE[m["role"]], i) for i, m in enumerate(messages)]

    if has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(
                rendered_messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # templates raise jinja exceptions for unsupported layouts
            raise PersonaxisError(f"the chat template rejected this chat: {exc}") from None
        template = "model"
    else:
        text = _fallback_text(rendered_messages, add_generation_prompt)
        template = "fallback"

    spans: list[tuple[int, int, Label, int]] = []  # char start, end, label, message index
    cursor = 0
    for piece, label, owner in pieces:
        cursor = _locate(text, piece, label, owner, cursor, spans, include_thinking)

    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    offsets = torch.tensor(encoded["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    labels = torch.zeros(len(ids), dtype=torch.int8)
    owner_of = torch.full((len(ids),), -1, dtype=torch.long)
    free = torch.ones(len(ids), dtype=torch.bool)
    for span_start, span_end, label, owner in spans:  # a token overlapping a span belongs to the first such span
        hit = free & (torch.clamp(offsets[:, 1], max=span_end) > torch.clamp(offsets[:, 0], min=span_start))
        labels[hit] = int(label)
        owner_of[hit] = owner
        free &= ~hit
    return RenderedChat(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=labels,
        message_index=owner_of,
        text=text,
        template=template,
        system_folded=folded,
        n_messages=len(messages),
    )


def _locate(
    text: str,
    piece: str,
    label: Label,
    owner: int,
    cursor: int,
    spans: list[tuple[int, int, Label, int]],
    include_thinking: bool,
) -> int:
    """Find `piece` in `text` from `cursor`, record its span(s), and return the new cursor."""
    needle = piece.strip()
    if not needle:
        return cursor
    start = text.find(needle, cursor)
    if start < 0 and label == Label.ASSISTANT and "</think>" in needle:
        # templates that drop reasoning from earlier turns keep only the visible answer
        needle = needle.rsplit("</think>", 1)[1].strip()
        start = text.find(needle, cursor) if needle else -1
    if start < 0:
        raise PersonaxisError(
            f"the chat template changed the text of message {owner} ({label.name.lower()}); cannot align its tokens"
        )
    end = start + len(needle)
    if label == Label.ASSISTANT:
        inner = cursor = start
        for match in _THINK.finditer(text, start, end):
            spans.append((inner, match.start(), Label.ASSISTANT, owner))
            spans.append((match.start(), match.end(), Label.ASSISTANT if include_thinking else Label.THINKING, owner))
            inner = match.end()
        spans.append((inner, end, Label.ASSISTANT, owner))
    else:
        spans.append((start, end, label, owner))
    return end


class TokenizerChat:
    """Chat rendering for any model handle with a `tokenizer` (the HF `ChatModel`, the vLLM `VLLMModel`)."""

    tokenizer: Any

    @property
    def has_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    @property
    def has_system_role(self) -> bool:
        return supports_system(self.tokenizer)

    def render(self, messages: list[dict[str, str]], **kwargs: Any) -> RenderedChat:
        return render_chat(self.tokenizer, messages, **kwargs)
