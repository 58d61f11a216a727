"""What a user sees of a long command when its output goes to a file (nohup, a scheduler, `2>&1 | tee`): plain lines
that say what is running and how far it has got, not a terminal's bars that would print nothing there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from personaxis.vectors import Vectors

CHATS = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Ahoy matey, the sea is calm."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr, buried treasure awaits."}],
    [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "The ship sails at dawn, matey."}],
]
PLAIN = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello. How can I help?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi. What do you need?"}],
]


def _logged(tmp_path: Path, *args: str) -> list[str]:
    """`personaxis ARGS` with stdout and stderr to one file, as a job's log; its lines."""
    log = tmp_path / "log.txt"
    # a line at every update: the tiny model's steps take well under the 2 s a log waits for by default
    env = {**os.environ, "PERSONAXIS_LOG_EVERY": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "from personaxis.cli.main import main; main()", *args]
    with log.open("w") as file:
        code = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    text = log.read_text()
    assert code == 0, text
    assert "\x1b[" not in text and "\r" not in text  # no terminal codes, no bar redrawn in place
    return text.splitlines()


def _step(lines: list[str], description: str) -> list[str]:
    return [line for line in lines if line.startswith(f"{description}: ")]


def test_demo_says_each_step_in_a_log(folder, tmp_path):
    lines = _logged(tmp_path, "demo", "--model", str(folder), "--out", str(tmp_path / "demo"), "--dtype", "float32")
    assert lines[0] == f"loading {folder}..."  # before torch is imported, not after
    generating = _step(lines, "generating")
    assert "generating: 12/12 (100%)" in [line.split(",")[0] for line in generating], lines
    assert all(" elapsed" in line for line in generating)
    assert any(", about " in line and " left" in line for line in generating), generating  # the time left
    assert _step(lines, "steering")[-1].startswith("steering: 3/3 (100%), ")
    assert any(line.startswith("  chosen layer ") for line in lines)


def test_extract_diff_says_its_progress_and_the_layers_that_separate(folder, tmp_path):
    pos, neg, out = tmp_path / "pos.jsonl", tmp_path / "neg.jsonl", tmp_path / "v.safetensors"
    for path, chats in ((pos, CHATS), (neg, PLAIN)):
        path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    lines = _logged(tmp_path, "extract", "-m", str(folder), "--diff", str(pos), str(neg), "--out", str(out),
                    "--batch-size", "1")  # fmt: skip
    assert lines[0] == f"loading {folder}..."
    capturing = [line.split(",")[0] for line in _step(lines, "capturing")]
    assert "capturing: 3/3 (100%)" in capturing and "capturing: 2/2 (100%)" in capturing, lines
    best = next(line for line in lines if line.startswith("best-separating layers"))
    separation = Vectors.load(out).meta.extra["separation"]
    top = max(range(4), key=lambda i: separation[i])
    assert best.split(": ", 1)[1].startswith(f"{top} (d {separation[top]:.1f})"), (best, separation)
