"""Whole-or-nothing file writes.

A reader (another process, or this one after a crash) sees either the old file or the complete new one, never a prefix:
the bytes go to a temporary file in the same folder, are flushed to disk, and `os.replace` swaps it in, which is atomic
on POSIX and Windows when source and target share a filesystem.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from personaxis.errors import PersonaxisError

# New files get the usual permissions (0o666 minus the umask), not mkstemp's private 0o600. Read once, at import.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically, creating missing parent folders.

    Raises `PersonaxisError` (one line) when the folder is not writable or the disk is full; the old file, if any, is
    then untouched and no temporary file is left behind.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise PersonaxisError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
