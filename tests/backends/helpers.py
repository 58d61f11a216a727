"""Test helpers: a tiny model saved to a folder, a thread-count switch, and a fake OpenAI-compatible server with
scripted faults."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path

import torch
from loopback import loopback
from tiny import build_tokenizer, tiny_llama

WORDS = "the quick brown fox jumps over lazy dog sea waves wind pirate hello there fine thank you".split()


def save_tiny(folder: Path, seed: int = 0) -> Path:
    """A 4-block random Llama with a ChatML template, saved like a real model (Ray workers load it by path)."""
    tokenizer = build_tokenizer()
    tiny_llama(len(tokenizer), seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run like a Ray worker with `n` CPUs: the thread count changes how matmuls split, hence the float rounding."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fake_reply(body: dict) -> tuple[str, str]:
    """The reply text and finish reason: a pure function of the request, so a retried request gets the same one."""
    seen = {k: body.get(k) for k in ("messages", "seed", "temperature", "top_p")}
    digest = hashlib.sha256(json.dumps(seen, sort_keys=True).encode()).digest()
    length = 3 + digest[0] % 8
    words = [WORDS[b % len(WORDS)] for b in digest[1 : 1 + length]]
    limit = body.get("max_tokens") or length
    return " ".join(words[:limit]), "length" if limit < length else "stop"


class FakeOpenAI:
    """Chat completions on 127.0.0.1 (random port). The last user message chooses the behaviour:

    "flaky": HTTP 500 on the first two attempts; "stall": the first attempt answers only after `stall` seconds (past
    the client's timeout); "broken": always 500 until `heal()`; "empty": an empty reply; else a normal reply.
    A request for a model other than `model` gets 404; with `key` set, another key gets 401.
    """

    def __init__(self, model: str = "served-model", stall: float = 3.0, key: str | None = None) -> None:
        self.model, self.stall, self.key = model, stall, key
        self.attempts: Counter[str] = Counter()  # per last user message
        self.bodies: list[dict] = []
        self.healed = False
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.base_url = ""
        self._server = contextlib.ExitStack()

    def heal(self) -> None:
        self.healed = True

    def __enter__(self) -> FakeOpenAI:
        self.base_url = self._server.enter_context(loopback(self.answer))
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()

    def answer(self, body: dict, headers: Message) -> tuple[int, dict]:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._answer(body, headers.get("Authorization", ""))
        finally:
            with self.lock:
                self.in_flight -= 1

    def _answer(self, body: dict, authorization: str) -> tuple[int, dict]:
        if self.key is not None and authorization != f"Bearer {self.key}":
            return 401, {"error": {"message": "bad key", "type": "invalid_request_error"}}
        if body.get("model") != self.model:
            return 404, {"error": {"message": f"no model {body.get('model')}", "type": "not_found"}}
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.bodies.append(body)
            attempt = self.attempts[prompt]
            self.attempts[prompt] += 1
        if ("flaky" in prompt and attempt < 2) or ("broken" in prompt and not self.healed):
            return 500, {"error": {"message": "internal error", "type": "server_error"}}
        if "stall" in prompt and attempt == 0:
            time.sleep(self.stall)
        text, finish = ("", "stop") if "empty" in prompt else fake_reply(body)
        return 200, {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [
                {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}},
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": 1},
        }
