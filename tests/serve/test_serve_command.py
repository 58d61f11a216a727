"""`personaxis serve` as users start it: a real process on loopback, answering the OpenAI SDK, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-c", "from personaxis.cli.main import main; main()", "serve", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_the_serve_command_answers_the_sdk_and_stops_on_interrupt(folder):
    from openai import OpenAI

    port = _free_port()
    server = _serve("--model", str(folder), "--port", str(port), "--max-tokens", "8", "--max-batch", "2",
                    "--max-messages", "2")  # fmt: skip
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert reply.usage.completion_tokens >= 1
        too_long = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                   "max_tokens": 9})  # fmt: skip
        assert too_long.status_code == 400 and "max_tokens" in too_long.text
        chat = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "?"},
        ]
        too_many = httpx.post(f"{url}/v1/chat/completions", json={"messages": chat})
        assert too_many.status_code == 400 and "above this server's limit of 2" in too_many.text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail("the server did not stop on SIGINT")
    assert server.returncode == 0, output
    assert f"127.0.0.1:{port}" in output  # uvicorn says where it listens: loopback by default


def test_serving_beyond_loopback_needs_a_key(tmp_path):
    server = _serve("--model", str(tmp_path / "nothing"), "--host", "0.0.0.0")
    output, _ = server.communicate(timeout=60)
    assert server.returncode == 2
    assert output.strip().splitlines()[-1].endswith("refusing to serve on 0.0.0.0 without --api-key (only loopback "
                                                    "may go without one)")  # fmt: skip


def test_serving_mistakes_fail_in_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path):
    from cli_runner import invoke

    not_json, a_list = tmp_path / "space.json", tmp_path / "list.json"
    not_json.write_text("{points")
    a_list.write_text("[]")
    (tmp_path / "empty").mkdir()
    nothing = str(tmp_path / "no-model-here")  # never reached: each mistake is found first
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cases = [
            (["--port", busy], f"cannot listen on 127.0.0.1:{busy}"),
            (["--port", 70000], "Invalid value for '--port'"),
            (["--host", "no-such-host.invalid", "--api-key", "k"], "cannot listen on no-such-host.invalid"),
            (["--space", not_json], f"{not_json}: invalid JSON at line 1, column 2"),
            (["--space", a_list], "expected a JSON object"),
            (["--space", tmp_path / "missing.json"], "missing.json: not found"),
            (["--port", _free_port(), "--threshold", "nan"], "closed loop: threshold must be finite"),
            (["--vectors", tmp_path / "empty"], "holds no vector files"),
            (["--window", 0], "Invalid value for '--window'"),
        ]
        for args, message in cases:
            code, _, err = invoke(monkeypatch, capsys, "serve", "--model", nothing, *args)
            assert code == 2 and message in err, (args, err)
            assert err.strip().count("\n") == 0 and "no model" not in err, err
