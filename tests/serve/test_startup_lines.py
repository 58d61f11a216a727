"""`personaxis serve` started with its output in a log: it says that it is loading, then where it serves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def test_serve_says_loading_then_where_it_serves(folder, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    env = {**os.environ, "PERSONAXIS_LOG_EVERY": "0", "OMP_NUM_THREADS": "1"}  # every step's line, however short
    command = [sys.executable, "-c", "from personaxis.cli.main import main; main()", "serve", "--model", str(folder),
               "--port", str(port), "--max-tokens", "8"]  # fmt: skip
    with log.open("w") as file:
        server = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while "serving on " not in log.read_text():
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            # the line comes once it listens: the address it gives answers at once
            assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    lines = log.read_text().splitlines()
    ours = [line for line in lines if not line.startswith("INFO:")]  # uvicorn's own lines aside
    assert ours[0] == "starting the server..."
    assert f"loading {folder}..." in ours
    url = f"http://127.0.0.1:{port}"
    serving = next(line for line in ours if line.startswith("serving on "))
    assert serving == f"serving on {url} (dashboard: {url}/, OpenAI API: {url}/v1; Ctrl-C stops)"
    assert ours.index(f"loading {folder}...") < ours.index(serving)
