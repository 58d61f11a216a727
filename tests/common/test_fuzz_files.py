"""The users'-file readers fuzzed: whatever the bytes, the answer is a valid result or a `PersonaxisError` whose one
line names the file, never another exception."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personaxis.common.datasets import read_chats, read_json
from personaxis.errors import PersonaxisError
from personaxis.model.chat import ROLES
from personaxis.vectors import CapConfig, Vectors, import_gguf, import_reference

FUZZ = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
LIMIT = sys.get_int_max_str_digits()

# JSON values, with the numbers and strings that break parsers: huge integers, non-finite floats, surrogates
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10 ** (LIMIT - 5), max_value=10 ** (LIMIT + 5)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.sampled_from(ROLES),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["messages", "role", "content", "x"]) | st.text(max_size=5), inner, max_size=4
        )
    ),
    max_leaves=20,
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "robot"]), "content": st.text() | scalars}), max_size=4
)
records = st.one_of(values, st.fixed_dictionaries({"messages": messages}), st.fixed_dictionaries({"messages": values}))


def _json_text(value: Any) -> str:
    with _digits(LIMIT * 3):  # write integers beyond the limit, which reading must refuse
        return json.dumps(value)


class _digits:
    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        self.old = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(self.limit)

    def __exit__(self, *exc: object) -> None:
        sys.set_int_max_str_digits(self.old)


nested = st.builds(
    lambda depth, opener, tail: opener * depth + tail,
    st.integers(min_value=1, max_value=60_000),
    st.sampled_from(["[", '{"a":', '{"messages": [']),
    st.sampled_from(["", "1", "]" * 3, "\n"]),
)
long_integers = st.builds(
    lambda n, sign, wrap: wrap.replace("N", sign + "7" * n),
    st.integers(min_value=LIMIT - 2, max_value=LIMIT + 50),
    st.sampled_from(["", "-"]),
    st.sampled_from(["N", '{"messages": N}', "[1, N]", '{"messages": [{"role": "user", "content": N}]}']),
)
lines = st.one_of(records.map(_json_text), nested, long_integers, st.text(max_size=40))
jsonl = st.lists(lines, min_size=0, max_size=5).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))
raw = st.binary(max_size=300)
bad_utf8 = st.builds(lambda a, b: a + b"\xff\xc3(" + b, jsonl, st.binary(max_size=20))
contents = st.one_of(jsonl, raw, bad_utf8)


def _answer(fn: Callable[[Path], Any], path: Path) -> Any:
    """The result, or None after checking the error is one line that names the file."""
    try:
        return fn(path)
    except PersonaxisError as exc:
        message = str(exc)
        assert "\n" not in message and message.strip(), message
        assert str(path) in message or path.name in message, message
        return None


@FUZZ
@given(data=contents)
def test_read_chats_answers_any_bytes(tmp_path, data):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(data)
    chats = _answer(read_chats, path)
    for chat in chats or []:
        assert chat and all(m["role"] in ROLES and isinstance(m["content"], str) for m in chat)
        for m in chat:
            m["content"].encode("utf-8")  # no unpaired surrogate gets through


@FUZZ
@given(
    data=st.one_of(
        records.map(_json_text).map(str.encode), nested.map(str.encode), long_integers.map(str.encode), raw, bad_utf8
    )
)
def test_read_json_answers_any_bytes(tmp_path, data):
    path = tmp_path / "space.json"
    path.write_bytes(data)
    _answer(read_json, path)


@FUZZ
@given(data=raw, prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"GGUF\x03\x00\x00\x00"]))
def test_reference_and_gguf_importers_answer_any_bytes(tmp_path, data, prefix):
    for name, reader in (("axis.pt", import_reference), ("cv.gguf", import_gguf)):
        path = tmp_path / name
        path.write_bytes(prefix + data)
        _answer(reader, path)


def _safetensors(header: bytes, body: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + body


headers = st.one_of(
    records.map(_json_text).map(str.encode),
    nested.map(str.encode),
    st.builds(
        lambda meta: json.dumps({"__metadata__": {"personaxis.kind": "vectors", "personaxis.meta": meta}}).encode(),
        st.one_of(records.map(_json_text), nested, long_integers),
    ),
    raw,
)


@FUZZ
@given(header=headers, body=st.binary(max_size=64))
def test_artifact_readers_answer_any_bytes(tmp_path, header, body):
    path = tmp_path / "v.safetensors"
    path.write_bytes(_safetensors(header, body))
    for reader in (Vectors.load, CapConfig.load):
        _answer(reader, path)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 3, 4), (5,)])
def test_reference_tensors_of_odd_shapes(tmp_path, shape):
    path = tmp_path / "assistant_axis.pt"
    torch.save(torch.randn(shape), path)
    assert _answer(import_reference, path) is None
