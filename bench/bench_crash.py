"""Crash benchmark: a real pipeline run on the real default model, SIGKILLed at 20 random points and resumed.

The same harness as tests/test_crash_safety.py (which it imports): an uninterrupted run first, then a run killed
at random points (chosen by how many records are stored, plus some in start-up), resumed after each kill, and
finally compared with the uninterrupted one: every record and every artifact must be equal bit for bit, and the
compute log must show that no sample was computed again once it had been stored.

A later stage (judged, calibration, sweep, drift, screening; see the test's module doc) runs in a copy of the
finished axis build, as in the test; `--kind all` runs every kind in turn, the axis build once for all of them.

    python bench/bench_crash.py [--kind KIND|all] [--model default] [--kills 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests")]
from test_crash_safety import BASE, KINDS, Job, Settings, crash_and_resume, finish, start, stored  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=(*KINDS, "all"), default="vectors")
    parser.add_argument("--model", default="default")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    settings = Settings(args.questions, args.samples, args.max_new_tokens)
    print(f"# personaxis crash bench: {args.kind} on {args.model}, {settings}")
    print(f"# {platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s) per run, seed {args.seed}")
    with tempfile.TemporaryDirectory(prefix="personaxis-crash-") as tmp:
        cleans: dict[str, Path] = {}
        for kind in KINDS if args.kind == "all" else (args.kind,):
            bench_kind(Job(kind, args.model, settings, args.threads), Path(tmp) / kind, args, cleans)


def clean_run(job: Job, workdir: Path, cleans: dict[str, Path]) -> Path:
    if job.kind not in cleans:
        run_dir = workdir / "clean"
        if job.kind in BASE:
            shutil.copytree(
                clean_run(
                    Job(BASE[job.kind], job.model, job.settings, job.threads), workdir.parent / BASE[job.kind], cleans
                ),
                run_dir,
            )
        began = time.monotonic()
        finish(start(job, run_dir), run_dir)
        print(f"\n## {job.kind}\nuninterrupted run: {stored(run_dir)} records in {time.monotonic() - began:.0f} s")
        cleans[job.kind] = run_dir
    return cleans[job.kind]


def bench_kind(job: Job, workdir: Path, args: argparse.Namespace, cleans: dict[str, Path]) -> None:
    clean = clean_run(job, workdir, cleans)
    base = cleans[BASE[job.kind]] if job.kind in BASE else None
    began = time.monotonic()
    report = crash_and_resume(job, workdir, args.kills, args.seed, clean, base=base)
    print(f"killed and resumed run: {time.monotonic() - began:.0f} s in all")
    if base is not None:
        print(f"(in a copy of the finished build: {report['first_record']} records; kill targets from there)")
    print("target: kill shortly after this many records are stored; timed: at a random time after the start")
    print("(for a later stage: after the stage begins)")
    print(f"{'kill':>4}  {'target':>6}  {'stored at kill':>14}  {'seconds after start':>19}  killed  half-written")
    for n, point in enumerate(report["kills"], start=1):
        timed = point["target"] == report["first_record"] and (base is not None or point["target"] == 0)
        target = "timed" if timed else point["target"]
        half = ",".join(point["half_written"]) or "none"
        print(f"{n:>4}  {target:>6}  {point['records']:>14}  {point['seconds']:>19.2f}  {point['killed']!s:>6}  {half}")
    killed = sum(p["killed"] for p in report["kills"])
    print(f"{killed} of {len(report['kills'])} runs were killed (the others had finished before their kill point)")
    print(f"records and artifacts equal to the uninterrupted run: yes (max abs difference {report['max_abs_diff']})")
    print(f"JSON files equal (times and the judge's own request counts left out): {', '.join(report['json_files'])}")
    for stage, work in report["work"].items():
        print(
            f"{stage}: {work['samples']} samples, {work['computed']} computations, {work['extra']} redone (in flight"
            f" at a kill, never stored), {work['recomputed_after_stored']} recomputed after being stored"
        )
    print(f"temporary files left behind: {report['leftover_temp_files'] or 'none'}")


if __name__ == "__main__":
    main()
