import dataclasses
import multiprocessing
import os
import pickle
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import torch

from personaxis.errors import PersonaxisError
from personaxis.store import RunStore, key

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def payload(i: int) -> tuple[dict, dict[str, torch.Tensor]]:
    return {"i": i, "text": "x" * (i % 97)}, {"mean": torch.full((4, 64), float(i)), "ids": torch.arange(i % 7)}


def check_record(k: str, rec) -> int:
    """A stored record is complete and is the one its key names."""
    i = rec.data["i"]
    data, tensors = payload(i)
    assert k == key(i=i)
    assert rec.data == data
    assert rec.tensors.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(rec.tensors[name], t)
    return i


def test_key_is_canonical():
    @dataclasses.dataclass
    class Sampling:
        temperature: float
        top_p: float

    a = key(model="m", chat=[{"role": "user", "content": "hi"}], sampling=Sampling(0.7, 0.9), path=Path("a/b"))
    b = key(
        path=Path("a/b"),
        sampling={"top_p": 0.9, "temperature": 0.7},
        chat=[{"content": "hi", "role": "user"}],
        model="m",
    )
    assert a == b and len(a) == 64
    assert key(model="m", temperature=0.7) != key(model="m", temperature=0.8)
    with pytest.raises(ValueError):
        key(x=float("nan"))


def test_round_trip(tmp_path):
    store = RunStore(tmp_path / "run")
    data, tensors = payload(5)
    k = key(i=5)
    assert not store.has("rollouts", k) and store.get("rollouts", k) is None
    assert store.put("rollouts", k, data, tensors)
    check_record(k, store.get("rollouts", k))
    assert store.get("rollouts", k, tensors=False).tensors == {}
    assert store.put("judge", k, {"score": None})  # stages are separate namespaces
    assert store.get("judge", k).data == {"score": None}
    assert store.keys("rollouts") == [k] and store.count("rollouts") == 1
    assert store.stages() == ["judge", "rollouts"]
    store.close()
    reopened = RunStore(tmp_path / "run")
    check_record(k, reopened.get("rollouts", k))
    bf16 = torch.randn(3, 5).to(torch.bfloat16)
    reopened.put("acts", k, {}, {"h": bf16[:, ::2]})  # non-contiguous views are fine
    assert torch.equal(reopened.get("acts", k).tensors["h"], bf16[:, ::2])


def test_first_record_wins(tmp_path):
    store = RunStore(tmp_path)
    k = key(i=1)
    assert store.put("s", k, {"v": 1})
    assert not store.put("s", k, {"v": 1})  # identical: no-op
    assert not store.put("s", k, {"v": 2})  # different: the first one is kept
    assert store.get("s", k).data == {"v": 1}
    assert store.put_many("s", [(k, {"v": 3}, None), (key(i=2), {"v": 4}, None)]) == 1


def test_items_pages_through_everything(tmp_path):
    store = RunStore(tmp_path)
    store.put_many("s", [(key(i=i), *payload(i)) for i in range(600)])
    seen = sorted(check_record(k, rec) for k, rec in store.items("s"))
    assert seen == list(range(600))
    assert [k for k, _ in store.items("s", tensors=False)] == store.keys("s")


def test_resume_with_pending(tmp_path):
    store = RunStore(tmp_path)
    wanted = [key(i=i) for i in range(10)]
    for k in wanted[:4]:
        store.put("s", k, {})
    todo = store.pending("s", wanted + wanted[:2])
    assert todo == wanted[4:]
    store.put_many("s", [(k, {}, None) for k in todo])
    assert store.pending("s", wanted) == []
    assert len(store.pending("s", [key(i=i) for i in range(2000)])) == 1990


def test_manifest(tmp_path):
    store = RunStore(tmp_path)
    first = store.manifest
    assert first["format"] == 1 and "personaxis_version" in first
    store.update_manifest(config={"layers": [1, 2]}, models={"target": {"id": "a", "revision": "r1"}})
    store.update_manifest(models={"judge": {"id": "b", "revision": None}}, config={"layers": [3]})
    m = RunStore(tmp_path).manifest
    assert m["models"] == {"target": {"id": "a", "revision": "r1"}, "judge": {"id": "b", "revision": None}}
    assert m["config"] == {"layers": [3]}
    assert m["created"] == first["created"]
    assert sorted(os.listdir(tmp_path))[0] == "manifest.json"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PersonaxisError, match="cannot create run folder"):
        RunStore(blocker / "run")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user that permissions apply to")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PersonaxisError):
            RunStore(folder)
    finally:
        folder.chmod(0o755)


def test_disk_full_is_one_clear_error_and_loses_nothing(tmp_path):
    store = RunStore(tmp_path)
    store.put_many("s", [(key(i=i), *payload(i)) for i in range(20)])
    conn = store._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # the database cannot grow: as good as a full disk
    big = {"h": torch.zeros(1 << 16)}
    with pytest.raises(PersonaxisError, match="disk is full.*rolled back") as info:
        store.put_many("s", [(key(big=j), {"i": -1}, big) for j in range(4)])
    assert "\n" not in str(info.value)
    assert store.count("s") == 20
    for k, rec in store.items("s"):
        check_record(k, rec)
    store.put("s", key(i=20), *payload(20))  # still usable for small records
    assert store.count("s") == 21


def _write_forever(path: str, ready) -> None:
    store = RunStore(path)
    i = 0
    while True:
        store.put_many("s", [(key(i=j), *payload(j)) for j in range(i, i + 5)])
        i += 5
        if i == 100:
            ready.set()


@needs_fork
def test_killed_writer_leaves_only_complete_records(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_write_forever, args=(str(tmp_path), ready))
    child.start()
    assert ready.wait(60)
    time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)  # almost surely in the middle of a transaction
    child.join()
    assert child.exitcode == -signal.SIGKILL

    store = RunStore(tmp_path)
    assert store._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    seen = sorted(check_record(k, rec) for k, rec in store.items("s"))
    assert len(seen) >= 100 and len(seen) % 5 == 0  # whole transactions only
    assert seen == list(range(len(seen)))
    assert store.pending("s", [key(i=i) for i in range(len(seen) + 5)]) == [
        key(i=i) for i in range(len(seen), len(seen) + 5)
    ]


def _write_range(store: RunStore, writer: int, start) -> None:
    start.wait()
    for i in range(300):  # shared keys: both processes race for each of them
        store.put("shared", key(i=i), {"i": i, "writer": writer})
    for i in range(100):
        store.put("own", key(i=i, writer=writer), *payload(i))
    sys.exit(0)


@needs_fork
def test_two_processes_write_at_once(tmp_path):
    store = RunStore(tmp_path, timeout=30)
    store.put("shared", key(i=0), {"i": 0, "writer": -1})  # the parent's connection exists before the fork
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    workers = [ctx.Process(target=_write_range, args=(store, w, start)) for w in (1, 2)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0

    assert store.count("shared") == 300
    records = dict(store.items("shared"))
    assert records[key(i=0)].data["writer"] == -1
    assert {rec.data["writer"] for rec in records.values()} <= {-1, 1, 2}
    assert all(k == key(i=rec.data["i"]) for k, rec in records.items())
    assert store.count("own") == 200
    for writer in (1, 2):
        for i in range(100):
            rec = store.get("own", key(i=i, writer=writer))
            assert rec is not None and rec.data == payload(i)[0]
    assert store._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_pickles_as_its_folder(tmp_path):
    store = RunStore(tmp_path, timeout=5)
    store.put("s", "k", {"v": 1})
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path and clone.timeout == 5
    assert clone.get("s", "k").data == {"v": 1}


def test_threads_share_one_store(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = RunStore(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: store.put("s", key(i=i), *payload(i)), range(200)))
    assert store.count("s") == 200


def test_not_a_database(tmp_path):
    (tmp_path / "records.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PersonaxisError, match="not a database"):
        RunStore(tmp_path)


def test_sqlite_is_in_wal_mode(tmp_path):
    store = RunStore(tmp_path)
    store.put("s", "k", {})
    conn = sqlite3.connect(tmp_path / "records.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
