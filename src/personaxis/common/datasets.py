"""Reading users' files: chat datasets (JSONL, one {"messages": [...]} object per line) and JSON documents, each
mistake one line that names the file and where in it.

Every file a user hands personaxis as text or JSON is read here, so that no such file can end in a traceback: not
UTF-8, invalid JSON, JSON nested too deeply for Python's parser, or an integer too long for Python to convert
(`sys.get_int_max_str_digits`) are all answered with a `PersonaxisError` that names the file and the line.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from personaxis.errors import PersonaxisError

_NUMBER = re.compile(r"-?(\d+)(\.\d+)?([eE][-+]?\d+)?")


def _decode(data: bytes, label: str, *, by_line: bool = False) -> str:
    """UTF-8 (a leading byte-order mark is dropped), or one line saying where the first bad byte is: `label: line
    L, column C ...` for a document, `label line L, column C ...` for JSONL (`by_line`), as its other errors read."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        where = f"{label}{'' if by_line else ':'} line {line}, column {column}"
        raise PersonaxisError(f"{where} (byte 0x{data[err.start]:02x}): not UTF-8 text") from None


def _read_bytes(path: str | os.PathLike, label: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PersonaxisError(f"{label}: not found") from None
    except IsADirectoryError:
        raise PersonaxisError(f"{label}: is a folder, not a file") from None
    except OSError as err:
        raise PersonaxisError(f"{label}: cannot read ({err.strerror or err})") from None


def read_text(path: str | os.PathLike, label: str | None = None) -> str:
    """A UTF-8 text file, or one line saying why not (missing, not text, unreadable)."""
    label = label or str(path)
    return _decode(_read_bytes(path, label), label)


def _deepest(text: str) -> int | None:
    """Where the nesting of a JSON text is deepest (strings skipped), or None if nothing nests."""
    depth = deepest = 0
    at, i, n = None, 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "[{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, i
        elif c in "]}":
            depth -= 1
        i += 1
    return at


def _long_integer(text: str) -> tuple[int, int] | None:
    """The first integer (outside strings) longer than Python converts, as (digits, index), or None."""
    limit = sys.get_int_max_str_digits()
    i, n = 0, len(text)
    while limit and i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c == "-" or "0" <= c <= "9":
            match = _NUMBER.match(text, i)
            if match is not None:
                if not (match[2] or match[3]) and len(match[1]) > limit:
                    return len(match[1]), i
                i = match.end()
                continue
        i += 1
    return None


def loads(text: str, label: str, *, line: int | None = None) -> Any:
    """Parse JSON from a user's file; every failure is one line naming `label` and where in it. `line` is the line
    number of `text` in its file when `text` is one line of JSONL."""

    def place(index: int | None) -> str:  # `label line N, column C` in JSONL, `label: line L, column C` otherwise
        if index is None:
            return label if line is None else f"{label} line {line}"
        lineno = text.count("\n", 0, index) + 1
        column = index - (text.rfind("\n", 0, index) + 1) + 1
        return (
            f"{label} line {line}, column {column}" if line is not None else f"{label}: line {lineno}, column {column}"
        )

    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if line is None:
            raise PersonaxisError(
                f"{label}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            ) from None
        raise PersonaxisError(f"{label} line {line}, column {err.colno}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise PersonaxisError(f"{place(_deepest(text))}: JSON nested too deeply to read") from None
    except ValueError as err:  # an integer longer than Python converts (`sys.set_int_max_str_digits`)
        found = _long_integer(text)
        if found is None:
            raise PersonaxisError(f"{place(None)}: unreadable JSON ({' '.join(str(err).split())})") from None
        digits, index = found
        raise PersonaxisError(
            f"{place(index)}: an integer of {digits} digits, more than Python reads ({sys.get_int_max_str_digits()})"
        ) from None


def parse_json(text: str, label: str) -> Any:
    """A JSON document from a user's file (`label` names it in every error)."""
    return loads(text, label)


def read_json(path: str | os.PathLike, label: str | None = None) -> Any:
    label = label or str(path)
    return loads(read_text(path, label), label)


def _lines(text: str) -> list[tuple[int, str]]:
    """Numbered lines as a text-mode file reads them (universal newlines), blank ones left out."""
    return [(number, line) for number, line in enumerate(io.StringIO(text, newline=None), start=1) if line.strip()]


def read_jsonl(path: str | os.PathLike, label: str | None = None) -> list[tuple[int, Any]]:
    """Every non-blank line of a JSONL file, parsed, with its line number; a bad line stops everything."""
    label = label or str(path)
    text = _decode(_read_bytes(path, label), label, by_line=True)
    return [(number, loads(line, label, line=number)) for number, line in _lines(text)]


def read_chats(path: str | os.PathLike, *, need_assistant: bool = False) -> list[list[dict[str, str]]]:
    """Load and check every line; a bad line stops everything with its line number, before any work is done."""
    from personaxis.model.chat import normalize_messages

    path = Path(path)
    if path.is_dir():
        raise PersonaxisError(f"{path} is a folder, not a chats file")
    if not path.is_file():
        raise PersonaxisError(f"no such file: {path}")
    chats = []
    for number, record in read_jsonl(path):
        where = f"{path} line {number}"
        if not isinstance(record, dict) or "messages" not in record:
            raise PersonaxisError(f"{where}: expected an object with a 'messages' list")
        messages = normalize_messages(record["messages"], where)
        for i, message in enumerate(messages):
            try:
                message["content"].encode("utf-8")
            except UnicodeEncodeError:
                raise PersonaxisError(
                    f"{where}: message {i} holds text that is not valid Unicode (an unpaired surrogate escape)"
                ) from None
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
