"""Plain `python -m vllm.entrypoints.openai.api_server` with the personaxis plugin (loopback only, stopped after).

Ops are chosen per request through `vllm_xargs` with names from `PERSONAXIS_VECTORS`; a malformed spec or an
unknown name is that request's own 400, and the server keeps serving.
"""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from personaxis.vectors import Vectors
from personaxis.vectors.artifact import VectorMeta

pytestmark = pytest.mark.vllm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(default_folder, hf_fp32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vectors")
    n, h = hf_fp32.n_layers, hf_fp32.hidden_size
    meta = VectorMeta(model_id=hf_fp32.name, hidden_size=h, n_layers=n, method="random", points_toward="test",
                      mean_norms={i: 30.0 for i in range(n)}, extra={"layer": 14})  # fmt: skip
    Vectors(range(n), {"evil": torch.randn(n, h, generator=torch.Generator().manual_seed(0))}, meta).save(
        folder / "evil.safetensors"
    )
    port = free_port()
    env = {**os.environ, "PERSONAXIS_VECTORS": str(folder), "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's own layout: engine core in its own process
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", default_folder, "--host",
         "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("vLLM exited: " + (folder / "server.log").read_text()[-2000:])
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            raise RuntimeError("vLLM did not start in time")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def chat(base, spec=None):
    body = {
        "model": httpx.get(f"{base}/v1/models").json()["data"][0]["id"],
        "messages": [{"role": "user", "content": "Plan my weekend"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    if spec is not None:
        body["vllm_xargs"] = {"personaxis": spec if isinstance(spec, str) else json.dumps(spec)}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)


def test_steering_through_vllm_xargs(server):
    plain = chat(server)
    assert plain.status_code == 200
    steered = chat(server, {"steer": [{"vector": "evil", "coef": 1.0, "layer": 14}]})
    assert steered.status_code == 200
    assert steered.json()["choices"][0]["message"]["content"] != plain.json()["choices"][0]["message"]["content"]
    again = chat(server)  # unsteered after a steered request with the same prompt: the salt kept them apart
    assert again.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{not json", "not valid JSON"),
        ({"steer": [{"vector": "good", "coef": 1.0}]}, "unknown vector 'good'"),
        ({"steer": [{"vector": "evil"}]}, "steer.0.coef"),
    ],
)
def test_a_bad_spec_is_its_own_400(server, spec, message):
    response = chat(server, spec)
    assert response.status_code == 400, response.text
    assert message in response.text
    assert chat(server).status_code == 200
