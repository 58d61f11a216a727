"""Crash benchmark: a real pipeline run on the real default model, SIGKILLed at 20 random points and resumed.

The same harness as tests/test_crash_safety.py (which it imports): an uninterrupted run first, then a run killed
at random points (chosen by how many records are stored, plus some in start-up), resumed after each kill, and
finally compared with the uninterrupted one: every record and every artifact must be equal bit for bit, and the
compute log must show that no sample was computed again once it had been stored.

    python bench/bench_crash.py [--kind vectors|axis] [--model default] [--kills 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests")]
from test_crash_safety import Job, Settings, crash_and_resume, finish, start, stored  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("vectors", "axis"), default="vectors")
    parser.add_argument("--model", default="default")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    job = Job(args.kind, args.model, Settings(args.questions, args.samples, args.max_new_tokens), args.threads)

    print(f"# personaxis crash bench: {args.kind} pipeline on {args.model}, {job.settings}")
    print(f"# {platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s) per run, seed {args.seed}")
    with tempfile.TemporaryDirectory(prefix="personaxis-crash-") as tmp:
        workdir = Path(tmp)
        began = time.monotonic()
        finish(start(job, workdir / "clean"), workdir / "clean")
        print(f"uninterrupted run: {stored(workdir / 'clean')} records in {time.monotonic() - began:.0f} s")
        began = time.monotonic()
        report = crash_and_resume(job, workdir, args.kills, args.seed, workdir / "clean")
        print(f"killed and resumed run: {time.monotonic() - began:.0f} s in all\n")

    print("target: kill shortly after this many records are stored; timed: at a random time after the start")
    print(f"{'kill':>4}  {'target':>6}  {'stored at kill':>14}  {'seconds after start':>19}  killed")
    for n, point in enumerate(report["kills"], start=1):
        target = point["target"] or "timed"
        print(f"{n:>4}  {target:>6}  {point['records']:>14}  {point['seconds']:>19.2f}  {point['killed']}")
    killed = sum(p["killed"] for p in report["kills"])
    print(f"\n{killed} of {len(report['kills'])} runs were killed (the others had finished before their kill point)")
    print(f"records and artifacts equal to the uninterrupted run: yes (max abs difference {report['max_abs_diff']})")
    for stage, work in report["work"].items():
        print(
            f"{stage}: {work['samples']} samples, {work['computed']} computations, {work['extra']} redone (in flight"
            f" at a kill, never stored), {work['recomputed_after_stored']} recomputed after being stored"
        )
    print(f"temporary files left behind: {report['leftover_temp_files'] or 'none'}")


if __name__ == "__main__":
    main()
