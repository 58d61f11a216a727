"""A run folder: sample-level records of every pipeline stage, atomic and resumable.

Each stage (rollouts, judge scores, activation means, ...) stores one record per sample under a content hash of whatever
determines it: model id and revision, the chat, the sampling parameters, the stage configuration (`key`). Resuming a run
is then just "compute what `pending` says is missing"; changing any input makes new keys, so old records are never
overwritten and stay valid for the configuration that produced them.

Layout of a run folder::

    manifest.json     what the run is (configuration, models, library version), human-readable, replaced atomically
    records.sqlite    the records (SQLite in WAL mode, plus its -wal/-shm side files while open)

Why SQLite: every `put` is one transaction, so a record is either fully stored or absent, even if the process is killed
mid-write (a half-written record is never read back), and several processes on one machine may read and write the same
run at once; writers queue on a busy timeout instead of failing. WAL needs a local filesystem (not NFS/SMB).
Tensors are stored with safetensors inside the row, never pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from personaxis import __version__
from personaxis.common.canonical import canonical_json, content_hash
from personaxis.errors import PersonaxisError
from personaxis.store.atomic import atomic_write_text

MANIFEST = "manifest.json"
DATABASE = "records.sqlite"
FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    stage TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    tensors BLOB,
    created REAL NOT NULL,
    PRIMARY KEY (stage, key)
)
"""
_PAGE = 256  # rows per query when iterating, so no read transaction stays open for long
_CHUNK = 500  # keys per IN (...) query, well under SQLite's variable limit

# Primary SQLite result codes worth a plain-words explanation.
_REASONS = {
    3: "permission denied",
    5: "the database stayed locked by another process",
    8: "the folder or database is read-only",
    10: "disk I/O error",
    11: "the database file is corrupt",
    13: "the disk is full",
    14: "cannot open the database file (is the folder writable?)",
    26: "records.sqlite is not a database file",
}


def key(**parts: Any) -> str:
    """Content hash (sha256 hex) of the keyword arguments: ``key(model=..., revision=..., chat=..., sampling=...)``."""
    return content_hash(parts)


@dataclasses.dataclass(frozen=True)
class Record:
    """One stored sample: its JSON data, its tensors (empty if none or not loaded) and when it was stored."""

    data: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    created: float


class RunStore:
    """A run folder holding a manifest and the sample-level records of each stage.

    Safe to use from several processes and threads at once. `put` keeps the first record stored under a key: keys are
    content hashes of the inputs, so a second, different payload for the same key can only come from a repeated
    non-deterministic computation (two workers sampling the same rollout), and the one already on disk, which later
    stages may have used, is the one to keep.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._inherited: list[sqlite3.Connection] = []
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PersonaxisError(f"cannot create run folder {self.path}: {e.strerror or e}") from e
        with self._transaction():  # the database write lock also serializes manifest writers
            if not (self.path / MANIFEST).exists():
                now = _now()
                self._write_manifest(
                    {"format": FORMAT, "personaxis_version": __version__, "created": now, "updated": now}
                )
        fmt = self.manifest.get("format", FORMAT)
        if not isinstance(fmt, int) or fmt > FORMAT:
            raise PersonaxisError(f"run folder {self.path} has format {fmt}; this personaxis reads up to {FORMAT}")

    key = staticmethod(key)

    # -- manifest ------------------------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        """The parsed manifest.json."""
        try:
            return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PersonaxisError(f"cannot read {self.path / MANIFEST}: {e}") from e

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the manifest and rewrite it atomically; returns the new manifest.

        A dict value is merged key by key into an existing dict (so ``models={"judge": ...}`` adds a model without
        dropping the others); any other value replaces the old one.
        """
        with self._transaction():
            manifest = self.manifest
            for name, value in fields.items():
                old = manifest.get(name)
                manifest[name] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
            manifest["personaxis_version"] = __version__
            manifest["updated"] = _now()
            self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: Mapping[str, Any]) -> None:
        text = json.dumps(json.loads(canonical_json(manifest)), indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(self.path / MANIFEST, text)

    # -- records -------------------------------------------------------------------------------------------------

    def put(
        self,
        stage: str,
        key: str,
        record: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> bool:
        """Store one record; True if written, False if the key was already there (the first record is kept)."""
        return self.put_many(stage, [(key, record, tensors)]) == 1

    def put_many(
        self,
        stage: str,
        items: Iterable[tuple[str, Mapping[str, Any], Mapping[str, torch.Tensor] | None]],
    ) -> int:
        """Store several records in one transaction (all or none); returns how many were new."""
        _check_stage(stage)
        now = time.time()
        rows = [(stage, k, canonical_json(dict(rec)), _pack(t), now) for k, rec, t in items]
        written = 0
        with self._transaction() as conn:
            for row in rows:
                written += conn.execute(
                    "INSERT INTO records (stage, key, data, tensors, created) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (stage, key) DO NOTHING",
                    row,
                ).rowcount
        return written

    def get(self, stage: str, key: str, *, tensors: bool = True) -> Record | None:
        """The record stored under `key`, or None. `tensors=False` skips decoding the tensors."""
        column = "tensors" if tensors else "NULL"
        rows = self._query(f"SELECT data, {column}, created FROM records WHERE stage = ? AND key = ?", (stage, key))
        return _record(*rows[0]) if rows else None

    def has(self, stage: str, key: str) -> bool:
        return bool(self._query("SELECT 1 FROM records WHERE stage = ? AND key = ?", (stage, key)))

    def keys(self, stage: str) -> list[str]:
        """All keys of a stage, sorted."""
        return [k for (k,) in self._query("SELECT key FROM records WHERE stage = ? ORDER BY key", (stage,))]

    def items(self, stage: str, *, tensors: bool = True) -> Iterator[tuple[str, Record]]:
        """(key, record) pairs of a stage in key order, read a page at a time."""
        column = "tensors" if tensors else "NULL"
        last = ""
        while True:
            rows = self._query(
                f"SELECT key, data, {column}, created FROM records WHERE stage = ? AND key > ?"
                f" ORDER BY key LIMIT {_PAGE}",
                (stage, last),
            )
            for k, data, blob, created in rows:
                yield k, _record(data, blob, created)
            if len(rows) < _PAGE:
                return
            last = rows[-1][0]

    def count(self, stage: str) -> int:
        return self._query("SELECT COUNT(*) FROM records WHERE stage = ?", (stage,))[0][0]

    def stages(self) -> list[str]:
        return [s for (s,) in self._query("SELECT DISTINCT stage FROM records ORDER BY stage", ())]

    def pending(self, stage: str, keys: Iterable[str]) -> list[str]:
        """The given keys that have no record yet, in their original order, without duplicates."""
        wanted = list(dict.fromkeys(keys))
        done: set[str] = set()
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._query(f"SELECT key FROM records WHERE stage = ? AND key IN ({marks})", (stage, *chunk))
            done.update(k for (k,) in rows)
        return [k for k in wanted if k not in done]

    # -- connection ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as its folder, so a store can be handed to spawned worker processes; each opens its own."""
        return (_reopen, (str(self.path), self.timeout))

    def _connection(self) -> sqlite3.Connection:
        """This process's connection; a forked child opens its own (SQLite connections must not cross a fork)."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:
            # Inherited from the parent: never use it and never close it here (closing could disturb the
            # parent's locks), just keep it referenced.
            self._inherited.append(self._conn)
        conn = sqlite3.connect(
            self.path / DATABASE, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable across process crashes, consistent always
            conn.execute(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate write transaction: committed whole, or rolled back on any error."""
        with self._lock, self._errors("write"):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite rolls back by itself when the connection or process goes away
                raise

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock, self._errors("read"):
            return self._connection().execute(sql, params).fetchall()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn SQLite's environment errors into one-line `PersonaxisError`s."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            code = getattr(e, "sqlite_errorcode", None)
            reason = _REASONS.get(code & 0xFF if code is not None else -1, str(e))
            note = "; that write was rolled back, earlier records are intact" if action == "write" else ""
            raise PersonaxisError(f"run store {self.path}: cannot {action}: {reason}{note}") from e


def _reopen(path: str, timeout: float) -> RunStore:
    return RunStore(path, timeout=timeout)


def _check_stage(stage: str) -> None:
    if not isinstance(stage, str) or not stage:
        raise PersonaxisError(f"a stage name must be a non-empty string, not {stage!r}")


def _pack(tensors: Mapping[str, torch.Tensor] | None) -> bytes | None:
    if not tensors:
        return None
    return _st_save({n: t.detach().cpu().clone(memory_format=torch.contiguous_format) for n, t in tensors.items()})


def _record(data: str, blob: bytes | None, created: float) -> Record:
    return Record(json.loads(data), _st_load(blob) if blob else {}, created)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
