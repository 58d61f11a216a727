"""Whole-or-nothing file writes.

A reader (another process, or this one after a crash) sees either the old file or the complete new one, never a prefix:
the bytes go to a temporary file in the same folder, are flushed to disk, and `os.replace` swaps it in, which is atomic
on POSIX and Windows when source and target share a filesystem.

A folder is written the same way (`atomic_dir`): filled under a temporary sibling name, then renamed into place.

A process killed mid-write leaves its temporary file or folder behind (nothing can run at a SIGKILL). Temporary names
carry the host and process id, so the next write of the same path, once it has succeeded, removes those of writers on
this host that are no longer alive; a live writer's, or another host's, is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_prefix(path)}{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
        _put_in_place(tmp, path)
        tmp = None
    except OSError as e:
        raise PersonaxisError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; when the block ends without an error, it becomes `path` whole.

    `path` must not exist, or be an empty folder. On an error the temporary folder is removed and `path` is untouched.
    """
    path = Path(path).expanduser().absolute()
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{_prefix(path)}{os.getpid()}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        if path.exists():
            path.rmdir()
        _put_in_place(tmp, path)
        tmp = None
    except OSError as e:
        raise PersonaxisError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _put_in_place(tmp: str | Path, path: Path) -> None:
    """Rename the finished temporary file or folder to `path`, durably, then clear dead writers' leftovers."""
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _remove_stale(path)


def _prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}-"


def _remove_stale(path: Path) -> None:
    """Remove the temporary files or folders of earlier writes of `path` whose writer, on this host, has died."""
    prefix = _prefix(path)
    for leftover in path.parent.glob(f"{prefix}*.tmp"):
        pid = leftover.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, and is someone else's
        return True
    return True


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
