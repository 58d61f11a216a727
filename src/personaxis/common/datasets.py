"""Reading users' files: chat datasets (JSONL, one {"messages": [...]} object per line) and JSON documents, each
mistake one line that names the file and where in it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from personaxis.errors import PersonaxisError
from personaxis.model.chat import normalize_messages


def read_text(path: str | os.PathLike, label: str | None = None) -> str:
    """A UTF-8 text file, or one line saying why not (missing, not text, unreadable)."""
    label = label or str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PersonaxisError(f"{label}: not found") from None
    except UnicodeDecodeError:
        raise PersonaxisError(f"{label}: not UTF-8 text") from None
    except OSError as err:
        raise PersonaxisError(f"{label}: cannot read ({err.strerror or err})") from None


def parse_json(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PersonaxisError(f"{label}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def read_json(path: str | os.PathLike, label: str | None = None) -> Any:
    label = label or str(path)
    return parse_json(read_text(path, label), label)


def read_chats(path: str | os.PathLike, *, need_assistant: bool = False) -> list[list[dict[str, str]]]:
    """Load and check every line; a bad line stops everything with its line number, before any work is done."""
    path = Path(path)
    if not path.is_file():
        raise PersonaxisError(f"no such file: {path}")
    chats = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PersonaxisError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise PersonaxisError(f"{where}: expected an object with a 'messages' list")
            messages = normalize_messages(record["messages"], where)
            if need_assistant and not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                raise PersonaxisError(f"{where}: the chat has no assistant turn")
            chats.append(messages)
    if not chats:
        raise PersonaxisError(f"{path} holds no chats")
    return chats


def neutral_texts() -> list[str]:
    from importlib.resources import files

    return json.loads(files("personaxis.data").joinpath("neutral.json").read_text(encoding="utf-8"))["texts"]


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'all', 'i,j,k' or 'a:b' (Python-style, b excluded; negatives count from the end)."""
    spec = spec.strip()
    try:
        if spec == "all":
            return list(range(n_layers))
        if ":" in spec:
            start, _, stop = spec.partition(":")
            layers = list(range(n_layers))[slice(int(start) if start else None, int(stop) if stop else None)]
        else:
            layers = [int(x) + (n_layers if int(x) < 0 else 0) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise PersonaxisError(f"bad layer spec {spec!r}: use all, i,j,k or a:b") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise PersonaxisError(f"layer spec {spec!r} is out of range for a {n_layers}-layer model (0..{n_layers - 1})")
    return sorted(set(layers))
