"""Canonical JSON and the content hashes made from it: the run store's sample keys and the artifacts' config hashes.

Keys are sorted and whitespace removed, so equal content gives equal text and equal hashes. Dataclasses, pydantic
models, paths, enums, sets and torch dtypes are converted; NaN and infinities are refused (they are not JSON, and a
missing value should be `None`). Note that `1` and `1.0` are different JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from typing import Any

import torch


def canonical_json(obj: Any) -> str:
    """The one JSON text of `obj`."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_jsonable
    )


def content_hash(obj: Any) -> str:
    """sha256 hex of `obj`'s canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"cannot hash a {type(obj).__name__} as JSON")
