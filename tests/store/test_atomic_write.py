import os

import pytest

from personaxis.errors import PersonaxisError
from personaxis.store import atomic_write_bytes, atomic_write_text


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
    import signal
    import socket
    import subprocess
    import sys

    target = tmp_path / "a.json"
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".a.json.{host}-{dead.pid}.abcd.tmp"
    live = tmp_path / f".a.json.{host}-{os.getppid()}.efgh.tmp"  # a writer that is still running
    other = tmp_path / f".a.json.elsewhere-{dead.pid}.ijkl.tmp"  # another host's: its pids mean nothing here
    for leftover in (stale, live, other):
        leftover.write_text("half")
    atomic_write_text(target, "whole")
    assert target.read_text() == "whole"
    assert not stale.exists() and live.exists() and other.exists()
