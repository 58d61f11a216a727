"""The users'-file readers: every way a file can be unreadable is one line naming the file and the line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from personaxis.common.datasets import loads, read_chats, read_json, read_jsonl, read_text
from personaxis.errors import PersonaxisError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD = json.dumps(CHAT) + "\n"


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(PersonaxisError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("second_line", "expected"),
    [
        (b'{"messages": "\xff\xfe"}\n', "line 2, column 15 (byte 0xff): not UTF-8 text"),
        (b"[" * 100_000 + b"\n", "line 2, column 100000: JSON nested too deeply to read"),
        (b'{"messages": ' + b"9" * 5000 + b"}\n", "line 2, column 14: an integer of 5000 digits"),
        (b"{not json\n", "line 2, column 2: invalid JSON"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}\n', "line 2: message 0 holds text that is not valid"),
        (b'["a list"]\n', "line 2: expected an object with a 'messages' list"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}\n', "line 2: message 0 needs a role"),
    ],
)
def test_a_bad_chats_line_is_one_line_with_its_number(tmp_path, second_line, expected):
    path = _write(tmp_path / "chats.jsonl", GOOD.encode() + second_line)
    message = _error(read_chats, path)
    assert message.startswith(f"{path} line 2") and expected in message, message


def test_chats_files_read_as_text_mode_reads_them(tmp_path):
    """A byte-order mark, Windows line ends and blank lines are fine, and line numbers count the blank lines."""
    path = _write(tmp_path / "c.jsonl", "\ufeff" + GOOD.replace("\n", "\r\n") + "\r\n\n" + GOOD + "{}\n")
    assert _error(read_chats, path).startswith(f"{path} line 5:")
    path.write_text("\ufeff" + GOOD + "\n" + GOOD, encoding="utf-8")
    assert read_chats(path) == [CHAT["messages"]] * 2


def test_what_is_not_a_chats_file(tmp_path):
    assert _error(read_chats, tmp_path) == f"{tmp_path} is a folder, not a chats file"
    assert _error(read_chats, tmp_path / "missing.jsonl") == f"no such file: {tmp_path / 'missing.jsonl'}"
    empty = _write(tmp_path / "empty.jsonl", "\n \n")
    assert _error(read_chats, empty) == f"{empty} holds no chats"
    no_reply = _write(tmp_path / "q.jsonl", json.dumps({"messages": CHAT["messages"][:1]}) + "\n")
    assert "the chat has no assistant turn" in _error(read_chats, no_reply, need_assistant=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": [1, ' + "9" * 5000 + "]}", "doc.json: line 1, column 11: an integer of 5000 digits"),
        ("\n\n  " + "[" * 50_000, "doc.json: line 3, column 50002: JSON nested too deeply to read"),
        ('{"x": 1,}', "doc.json: invalid JSON at line 1, column 9: Expecting property name"),
        ("", "doc.json: invalid JSON at line 1, column 1: Expecting value"),
    ],
)
def test_a_bad_json_document_says_where(text, expected):
    assert expected in _error(loads, text, "doc.json")


def test_what_looks_like_a_problem_but_is_not():
    """Digits inside a string, deep brackets inside a string and long floats are plain JSON."""
    assert loads('{"a": "' + "9" * 5000 + '"}', "doc.json") == {"a": "9" * 5000}
    assert loads('"' + "[" * 5000 + '"', "doc.json") == "[" * 5000
    assert loads("1." + "5" * 5000, "doc.json") == pytest.approx(14 / 9)
    assert loads("-" + "9" * sys.get_int_max_str_digits(), "doc.json") < 0


def test_read_json_and_read_text(tmp_path):
    assert read_json(_write(tmp_path / "a.json", '\ufeff{"a": 1}')) == {"a": 1}
    bad = _write(tmp_path / "b.json", b'{"a": 1}\n\n  \xc3(')
    assert _error(read_text, bad) == f"{bad}: line 3, column 3 (byte 0xc3): not UTF-8 text"
    assert _error(read_json, bad, "the space") == "the space: line 3, column 3 (byte 0xc3): not UTF-8 text"
    assert _error(read_text, tmp_path) == f"{tmp_path}: is a folder, not a file"
    assert _error(read_text, tmp_path / "none.json").endswith("none.json: not found")


def test_read_jsonl_keeps_line_numbers(tmp_path):
    path = _write(tmp_path / "r.jsonl", '{"a": 1}\n\n[2]\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (3, [2])]
