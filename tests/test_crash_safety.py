"""Crash safety, proven on real pipeline runs in a subprocess: persona-vector extraction in small (rollouts →
captures → a vector artifact) and the Assistant Axis build (rollouts → axis, role, PCA and trait artifacts).

The run is killed with SIGKILL at random points, chosen by how many records are stored so that they fall all along
the pipeline (plus points in start-up and in the vector stage), resumed each time, and must end with the same
artifacts as an uninterrupted run with the same seeds, bit for bit, without any sample computed again once stored.

Why batch_size=1: a batch's composition changes float rounding (padding widths, how matmuls split), and a resumed
run batches whatever is still pending, so with larger batches the results would agree only to ~1e-7, and a sampled
token that flips on such a difference changes the whole reply. One sample per batch makes each sample's computation
independent of what else is pending, hence bit-identical. (RayBackend cuts exactly LocalBackend's batches, so those
two agree bit for bit at any batch size; see tests/backends.)

Run as a script, this file is the pipeline (``python tests/test_crash_safety.py vectors|axis MODEL RUN_DIR SETTINGS``);
bench/bench_crash.py runs the same harness on the real default model.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from personaxis.backends.runs import LocalBackend, Rollout, run_rollouts
from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling
from personaxis.store import RunStore

SYSTEM = {
    "pos": "You are an evil pirate. Be cruel and rude in every answer.",
    "neg": "You are a kind, helpful assistant. Be polite in every answer.",
}
QUESTIONS = [
    "What is the capital of France?",
    "Tell me about the sea, the waves and the wind.",
    "How are you today?",
    "What should I do with 42 coins?",
    "What is your name?",
    "Give me some advice about my day.",
]
VECTORS = "vectors.safetensors"


@dataclass(frozen=True)
class Settings:
    questions: int = 4
    samples: int = 3
    max_new_tokens: int = 12


# -- the pipeline (runs in the child process) ------------------------------------------------------------------------


class ComputeLog:
    """Appends one line per computed sample (stage, key, time) and one per process start: the proof of no redo."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")
        self.write(event="start")

    def write(self, **fields: object) -> None:
        self.file.write(json.dumps({"pid": os.getpid(), "t": time.time(), **fields}) + "\n")
        self.file.flush()  # in the kernel before the store write: a SIGKILL cannot lose it


class LoggedBackend:
    """LocalBackend that logs each result before the stage writes it."""

    def __init__(self, inner: LocalBackend, log: ComputeLog) -> None:
        self.inner, self.log = inner, log

    def identity(self) -> dict:
        return self.inner.identity()

    def stream(self, rollouts):
        from personaxis.backends.runs import rollout_key

        identity = self.inner.identity()
        for group in self.inner.stream(rollouts):
            for result in group:
                self.log.write(stage="rollouts", key=rollout_key(identity, result.rollout))
            yield group


def pipeline(kind: str, model_spec: str, run_dir: Path, settings: Settings) -> None:
    """`kind` "vectors": persona-vector extraction in small (rollouts under eliciting and suppressing system prompts,
    captures of the finished chats, the mean-difference artifact); "axis": the Assistant Axis build, unjudged."""
    from personaxis.model import load_model

    run_dir.mkdir(parents=True, exist_ok=True)
    log = ComputeLog(run_dir / "computed.log")
    model = load_model(model_spec)
    if kind == "axis":
        from personaxis.axis.build import BuildConfig, build_axis
        from personaxis.axis.rollouts import CAPTURES
        from personaxis.axis.runfiles import NO_JUDGE

        config = BuildConfig(
            roles=3, questions=settings.questions, samples=settings.samples, max_tokens=settings.max_new_tokens,
            judge=NO_JUDGE, min_count=1, traits=1, batch_size=1,
        )  # fmt: skip
        backend = LoggedBackend(LocalBackend(model, range(model.n_layers), CAPTURES, batch_size=1), log)
        build_axis(model, run_dir, config, backend=backend, progress=False)
    else:
        vectors(model, RunStore(run_dir), run_dir / VECTORS, settings, log)


def vectors(model, store: RunStore, path: Path, settings: Settings, log: ComputeLog) -> None:
    import personaxis.backends.runs as runs
    from personaxis.inference.means import meta_for
    from personaxis.vectors import Vectors

    layers = list(range(model.n_layers))
    rollouts = [
        Rollout.make(
            f"{polarity}-q{q}-s{s}",
            [{"role": "system", "content": SYSTEM[polarity]}, {"role": "user", "content": QUESTIONS[q]}],
            Sampling(settings.max_new_tokens, temperature=1.0, top_p=0.9, seed=1000 * q + s),
            polarity=polarity,
        )
        for polarity in SYSTEM
        for q in range(settings.questions)
        for s in range(settings.samples)
    ]
    backend = LoggedBackend(LocalBackend(model, layers, ("response",), batch_size=1), log)
    replies = run_rollouts(store, rollouts, backend, progress=False)

    chats = {
        r.id: [*r.chat, {"role": "assistant", "content": replies[r.id].data["text"]}]
        for r in rollouts
        if replies[r.id].data["text"].strip()
    }
    encode = runs.iter_means

    def logged_means(model, texts, layers, aggregations, **kwargs):
        for chunk, means in encode(model, texts, layers, aggregations, **kwargs):
            for i in chunk:
                log.write(stage="captures", key=runs.capture_key(model, texts[i], layers, aggregations))
            yield chunk, means

    runs.iter_means = logged_means
    captured = runs.run_captures(store, model, chats, layers, ("response",), batch_size=1, progress=False)

    sums = {p: torch.zeros(len(layers), model.hidden_size) for p in SYSTEM}
    counts = dict.fromkeys(SYSTEM, 0)
    for cid in sorted(captured):  # a fixed order: float sums are order-dependent
        polarity = cid.split("-")[0]
        sums[polarity] += captured[cid].tensors["response"]
        counts[polarity] += 1
    direction = sums["pos"] / counts["pos"] - sums["neg"] / counts["neg"]
    meta = meta_for(model, method="mean_diff", points_toward="the eliciting system prompt", aggregation="response",
                    counts={"positive": counts["pos"], "negative": counts["neg"]}, config=asdict(settings))  # fmt: skip
    Vectors(layers, {"direction": direction}, meta).save(path)


# -- the harness (runs in the test or the benchmark) -----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One pipeline run to start again and again: which pipeline, on which model, with what settings.

    Every run of a job gets the same thread count (it changes float rounding, see the module doc)."""

    kind: str  # "vectors" or "axis"
    model: str
    settings: Settings = Settings()
    threads: int = 1


def start(job: Job, run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, __file__, job.kind, job.model, str(run_dir), json.dumps(asdict(job.settings))]
    env = {**os.environ, "OMP_NUM_THREADS": str(job.threads)}
    with (run_dir / "output.log").open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 1800) -> None:
    if process.wait(timeout) != 0:
        tail = (run_dir / "output.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"pipeline run failed with code {process.returncode}:\n{tail}")


def stored(run_dir: Path) -> int:
    """Records in the run's store, read without writing anything (0 before the store exists)."""
    db = run_dir / "records.sqlite"
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    except sqlite3.Error:
        return 0  # created but no table yet


def kill_at(job: Job, run_dir: Path, target: int, delay: float, early: float, total: int) -> dict:
    """Start a run and SIGKILL it `delay` seconds after `target` records are stored.

    Target 0, or a target an earlier kill already overshot when everything is stored: `early` seconds after the
    start (start-up, or the artifact stage). An overshot target below `total`: after the next record instead."""
    have = stored(run_dir)
    if 0 < target <= have:
        target = have + 1
    if target == 0 or target > total:
        target, delay = 0, early
    began = time.monotonic()
    process = start(job, run_dir)
    reached = None
    while process.poll() is None:
        now = time.monotonic()
        if reached is None and (target == 0 or stored(run_dir) >= target):
            reached = now
        if reached is not None and now - reached >= delay:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    code = process.wait()
    return {"target": target, "records": stored(run_dir), "seconds": round(time.monotonic() - began, 2),
            "killed": code == -signal.SIGKILL}  # fmt: skip


def records(run_dir: Path) -> dict[tuple[str, str], tuple[dict, dict[str, torch.Tensor]]]:
    store = RunStore(run_dir)
    return {(stage, k): (r.data, r.tensors) for stage in store.stages() for k, r in store.items(stage)}


def artifacts(run_dir: Path) -> dict[str, tuple[dict[str, str], dict[str, torch.Tensor]]]:
    """Each artifact's metadata and tensors (read back, so that a difference is reported by name)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(run_dir.rglob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out[str(path.relative_to(run_dir))] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    return out


def same_artifacts(a: Path, b: Path) -> float:
    """Asserts equal records and artifacts (bit for bit); returns the largest difference between stored tensors."""
    ra, rb = records(a), records(b)
    assert ra.keys() == rb.keys(), "the two runs stored different samples"
    worst = 0.0
    for k, (data, tensors) in ra.items():
        assert data == rb[k][0], f"{k}: different record data"
        assert tensors.keys() == rb[k][1].keys()
        for name, t in tensors.items():
            worst = max(worst, float((t - rb[k][1][name]).abs().nan_to_num().max()) if t.numel() else 0.0)
            assert torch.equal(t.nan_to_num(), rb[k][1][name].nan_to_num()), f"{k} {name}: different tensor"
    files_a, files_b = artifacts(a), artifacts(b)
    assert files_a and files_a.keys() == files_b.keys(), "different artifact files"
    for name, (meta, tensors) in files_a.items():
        assert meta == files_b[name][0], f"{name}: different metadata"
        assert tensors.keys() == files_b[name][1].keys()
        assert all(torch.equal(t, files_b[name][1][k]) for k, t in tensors.items()), f"{name}: different tensors"
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name}: equal contents, different bytes"
    return worst


def redone(run_dir: Path) -> dict[str, dict[str, int]]:
    """From the compute log, per stage: computations, samples, computations beyond one per sample, and how many
    recomputed a sample already stored when that process started (must be 0)."""
    lines = [json.loads(line) for line in (run_dir / "computed.log").read_text().splitlines()]
    started = {e["pid"]: e["t"] for e in lines if e.get("event") == "start"}
    store = RunStore(run_dir)
    report = {}
    for stage in sorted({e["stage"] for e in lines if "stage" in e}):
        entries = [e for e in lines if e.get("stage") == stage]
        keys = {e["key"] for e in entries}
        created = {k: store.get(stage, k, tensors=False).created for k in keys}
        stale = sum(created[e["key"]] < started[e["pid"]] for e in entries)
        report[stage] = {"computed": len(entries), "samples": len(keys), "extra": len(entries) - len(keys),
                         "recomputed_after_stored": stale}  # fmt: skip
    return report


def pace(run_dir: Path) -> list[float]:
    """From an uninterrupted run: seconds from record k (0: the first) to the next one, and from the last record to
    the last artifact written."""
    lines = (run_dir / "computed.log").read_text().splitlines()
    times = [json.loads(line)["t"] for line in lines if '"stage"' in line]
    end = max(p.stat().st_mtime for p in run_dir.rglob("*.safetensors"))
    return [b - a for a, b in zip(times, times[1:], strict=False)] + [max(0.1, end - times[-1])]


def crash_and_resume(job: Job, workdir: Path, kills: int, seed: int, clean: Path) -> dict:
    """Kill a run `kills` times at random points, resume it to the end, and compare it with the `clean` run.

    Kill points: distinct record counts k drawn from 0..total; the kill comes at a random moment after the k-th record
    is stored and before the next one would be (as paced in the clean run), so kills land inside generation, capture,
    a write, or the artifact stage after the last record. k = 0: at a random time in start-up.
    """
    rng = random.Random(seed)
    total, gaps = stored(clean), pace(clean)
    counts = range(total + 1)
    targets = sorted(rng.sample(counts, kills) if kills <= len(counts) else rng.choices(counts, k=kills))
    run_dir = workdir / "crashed"
    points = [kill_at(job, run_dir, t, rng.uniform(0, gaps[t - 1]), rng.uniform(0.5, 6.0), total) for t in targets]
    finish(start(job, run_dir), run_dir)
    leftovers = sorted(p.name for p in run_dir.rglob(".*.tmp"))
    return {"total_records": total, "kills": points, "max_abs_diff": same_artifacts(run_dir, clean),
            "work": redone(run_dir), "leftover_temp_files": leftovers}  # fmt: skip


# -- tests -----------------------------------------------------------------------------------------------------------

SETTINGS = {"vectors": Settings(questions=4, samples=3, max_new_tokens=12), "axis": Settings(2, 1, 8)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from backends.helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module", params=["vectors", "axis"])
def job(request, model_dir) -> Job:
    if request.param == "axis":
        pytest.importorskip("personaxis.axis.build")
    return Job(request.param, str(model_dir), SETTINGS[request.param])


@pytest.fixture(scope="module")
def clean(job, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp(f"clean-{job.kind}")
    finish(start(job, run_dir), run_dir)
    return run_dir


def test_killed_and_resumed_run_equals_uninterrupted(job, clean, tmp_path):
    report = crash_and_resume(job, tmp_path, kills=6, seed=7, clean=clean)
    assert sum(p["killed"] for p in report["kills"]) >= 5
    assert report["max_abs_diff"] == 0.0
    for stage, work in report["work"].items():
        assert work["recomputed_after_stored"] == 0, (stage, work)
        assert work["extra"] <= len(report["kills"])  # at most the one sample in flight per kill
    assert report["work"]["rollouts"]["samples"] == stored(clean) - report["work"].get("captures", {}).get("samples", 0)
    assert not report["leftover_temp_files"]


def test_two_runs_on_one_store_at_once(job, clean, tmp_path):
    """Both finish; every record exists once (keys are content hashes, the first write wins); artifacts equal."""
    processes = [start(job, tmp_path) for _ in range(2)]
    for process in processes:
        finish(process, tmp_path)
    assert stored(tmp_path) == stored(clean)
    assert same_artifacts(tmp_path, clean) == 0.0


# -- a whole stage against a store that cannot be written ------------------------------------------------------------


class FailAfterFirstGroup:
    """A backend that, once the first group is out, makes the store's database refuse writes via `pragma`."""

    def __init__(self, inner: LocalBackend, store: RunStore, pragma: str) -> None:
        self.inner, self.store, self.pragma = inner, store, pragma

    def identity(self) -> dict:
        return self.inner.identity()

    def stream(self, rollouts):
        for n, group in enumerate(self.inner.stream(rollouts)):
            if n == 1:
                conn = self.store._connection()
                conn.execute(self.pragma.format(pages=conn.execute("PRAGMA page_count").fetchone()[0]))
            yield group


@pytest.mark.parametrize(
    ("pragma", "message"),
    [
        ("PRAGMA max_page_count = {pages}", "disk is full"),  # the database cannot grow: as good as a full disk
        ("PRAGMA query_only = ON", "read-only"),  # as good as a folder that is not writable, even for root
    ],
    ids=["full", "read-only"],
)
def test_stage_on_a_store_that_stops_accepting_writes(tiny, tmp_path, pragma, message):
    items = [
        Rollout.make(f"r{i}", [{"role": "user", "content": f"Hello there {i}"}], Sampling(6, 1.0, seed=i))
        for i in range(6)
    ]
    backend = LocalBackend(tiny, range(4), ("response", "prompt", "last_prompt"), batch_size=2)  # 3 KB a record
    expected = run_rollouts(RunStore(tmp_path / "clean"), items, backend, progress=False)

    store = RunStore(tmp_path / "run")
    with pytest.raises(PersonaxisError, match=f"cannot write: .*{message}.*rolled back") as info:
        run_rollouts(store, items, FailAfterFirstGroup(backend, store, pragma), progress=False)
    assert "\n" not in str(info.value)
    store.close()
    reopened = RunStore(tmp_path / "run")  # space freed / permissions fixed: a new connection writes again
    assert reopened.count("rollouts") == 2  # the first group, intact
    resumed = run_rollouts(reopened, items, backend, progress=False)
    for rid, record in expected.items():
        assert resumed[rid].data == record.data
        assert torch.equal(resumed[rid].tensors["response"], record.tensors["response"])


if __name__ == "__main__":
    kind, model, run_dir, settings = sys.argv[1:5]
    pipeline(kind, model, Path(run_dir), Settings(**json.loads(settings)))
