"""Fixtures for the trait pipeline: a small trait, deterministic fake judges, and a fake OpenAI-compatible server."""

import functools
import hashlib
import json
import math

import pytest
from cli_runner import invoke
from loopback import loopback

from personaxis.judge import Distribution, Judge
from personaxis.traits.library import parse_trait


def text_score(text: str, lo: int = 0, hi: int = 100) -> int:
    """A deterministic score in [lo, hi] from a text: fake judges spread their answers with it."""
    return lo + int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % (hi - lo + 1)


class HashJudge(Judge):
    """Trait scores spread over 0-100, coherence over 30-100, both from the prompt text; counts what it is asked."""

    def __init__(self, cache=None, numbers: bool = True) -> None:
        super().__init__("hash-judge", cache=cache)
        self.asked = 0
        self.numbers = numbers

    def _number_probs(self, prompts, hi):
        self.asked += len(prompts)
        if not self.numbers:  # a judge that answers in words: no mass on any number
            return [Distribution({}, raw="I cannot rate this") for _ in prompts]
        out = []
        for p in prompts:
            score = text_score(p, 30, 100) if "how coherent" in p else text_score(p)
            out.append(Distribution({score: 0.9}, raw=str(score)))
        return out


@pytest.fixture
def hash_judge():
    return HashJudge


TRAIT = {
    "name": "pirate",
    "version": 1,
    "description": "Talks like a pirate.",
    "instructions": [
        {"pos": "You are a pirate. Ahoy matey!", "neg": "You are a helpful assistant."},
        {"pos": "Tell me about the sea, the waves and the wind, pirate.", "neg": "Answer plainly and briefly."},
    ],
    "questions": {
        "extraction": ["What is the capital of France?", "How are you today?", "Tell me about the sea."],
        "evaluation": ["What is the capital?", "Hello there, how are you?", "Tell me about the wind."],
    },
    "rubric": "Rate how much this is like a pirate.\nQuestion: {question}\nAnswer: {answer}\nReply 0-100 or REFUSAL.",
}


@pytest.fixture
def small_trait():
    return parse_trait(TRAIT, strict=False)


@pytest.fixture
def trait_file(tmp_path):
    path = tmp_path / "pirate.json"
    path.write_text(json.dumps(TRAIT))
    return path


class FakeOpenAI:
    """Chat completions on loopback: judge requests (logprobs) get a hashed score, others the scripted replies."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self.requests: list[dict] = []
        self.url = ""

    def answer(self, body: dict) -> dict:
        self.requests.append(body)
        content = body["messages"][-1]["content"]
        if body.get("logprobs"):
            score = str(text_score(content, 30, 100) if "how coherent" in content else text_score(content))
            alts = [{"token": score, "logprob": math.log(0.9), "bytes": list(score.encode())}]
            logprobs = {"content": [{**alts[0], "top_logprobs": alts}], "refusal": None}
            message = {"role": "assistant", "content": score}
        else:
            generated = sum(not r.get("logprobs") for r in self.requests)
            message = {"role": "assistant", "content": self.replies[min(generated, len(self.replies)) - 1]}
            logprobs = None
        return {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": message, "logprobs": logprobs}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip


@pytest.fixture
def fake_openai():
    fake = FakeOpenAI()
    with loopback(lambda body, headers: (200, fake.answer(body))) as fake.url:
        yield fake


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `personaxis ARGS...` through the real entry point; (code, out, err)."""
    return functools.partial(invoke, monkeypatch, capsys)
