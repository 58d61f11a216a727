import os

import pytest

from personaxis.errors import PersonaxisError
from personaxis.store import atomic_dir, atomic_write_bytes, atomic_write_text


def test_write_and_replace(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["report.json"]


def test_new_file_gets_ordinary_permissions(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_replace_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(PersonaxisError, match="No space left"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_unwritable_location_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PersonaxisError, match="cannot write"):
        atomic_write_text(blocker / "x.txt", "data")


def test_a_dead_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A SIGKILL mid-write leaves the temporary file; the next write of the same file removes it, and only it."""
    import socket

    target = tmp_path / "a.json"
    dead, host = _dead_pid(), socket.gethostname()
    stale = tmp_path / f".a.json.{host}-{dead}.abcd.tmp"
    live = tmp_path / f".a.json.{host}-{os.getppid()}.efgh.tmp"  # a writer that is still running
    other = tmp_path / f".a.json.elsewhere-{dead}.ijkl.tmp"  # another host's: its pids mean nothing here
    for leftover in (stale, live, other):
        leftover.write_text("half")
    atomic_write_text(target, "whole")
    assert target.read_text() == "whole"
    assert not stale.exists() and live.exists() and other.exists()


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed before the end")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written, no temporary folder left
    out.mkdir()  # an empty folder is taken over
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("whole")
    assert (out / "weights").read_text() == "whole" and list(tmp_path.iterdir()) == [out]


def test_atomic_dir_refuses_a_folder_with_files_and_keeps_them(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old").write_text("kept")
    with pytest.raises(PersonaxisError, match="^cannot write .*adapter: "), atomic_dir(out) as tmp:
        (tmp / "new").write_text("x")
    assert [p.name for p in out.iterdir()] == ["old"] and list(tmp_path.iterdir()) == [out]


def test_a_dead_writers_temporary_folder_is_removed_by_the_next_write(tmp_path):
    import socket

    stale = tmp_path / f".adapter.{socket.gethostname()}-{_dead_pid()}.abcd.tmp"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"whole")
    assert not stale.exists() and (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == b"whole"


def _dead_pid() -> int:
    import signal
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    return dead.pid
