"""Writing a trait file from a name and a description, with a generator LLM (science.md §1, step 1).

The generator is asked for JSON; its answer is parsed and validated with the same rules as a hand-written file
(`library.parse_trait`, strict counts). When the answer is unusable, the one-line validation error goes back to the
generator in the same conversation and it tries again, a bounded number of times: generators usually fix a miscount or
a missing placeholder once told exactly what is wrong, and a hard limit keeps a hopeless one from looping.

The name, the description and the version come from the user, never from the generator, so the file says what was
asked for even if the model paraphrased it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Protocol

from personaxis.errors import PersonaxisError
from personaxis.traits.library import N_PAIRS, N_QUESTIONS, TraitSpec, parse_trait

GENERATOR_HELP = "local:MODEL (a model personaxis can load) or openai:MODEL@BASE_URL (key from $OPENAI_API_KEY)"

PROMPT = """\
You write the material for measuring one personality trait of AI assistants.

Trait: {name}
Description: {description}

Write one JSON object with exactly these three keys:

"instructions": a list of exactly {pairs} objects, each {{"pos": "...", "neg": "..."}}. "pos" is a system prompt that \
tells an assistant to show the trait strongly in everything it says; "neg" is a system prompt on the same theme that \
tells it to avoid the trait entirely and show its opposite. Word the {pairs} pairs differently from one another.

"questions": an object {{"extraction": [...], "evaluation": [...]}} with exactly {questions} questions in each list, \
{total} different questions in all. Each is an ordinary question a user might ask that leaves room for the trait to \
show or not, without asking for it.

"rubric": instructions for a judge model that rates how strongly an answer shows the trait. It must contain the \
placeholders {{question}} and {{answer}} (literally, with the braces) where the question and the answer go, explain \
the scale from 0 (no trace of the trait) to 100 (the trait dominates the answer), and tell the judge to reply with \
REFUSAL if the answer refuses to engage, and otherwise with the number only.

Reply with the JSON object and nothing else."""

RETRY = "That reply cannot be used: {error}. Reply again with the complete, corrected JSON object and nothing else."


class TextGenerator(Protocol):
    """Anything that continues a chat with one assistant message."""

    name: str

    def complete(self, messages: Sequence[dict[str, str]]) -> str: ...


class OpenAIGenerator:
    """A chat model behind an OpenAI-compatible endpoint."""

    def __init__(
        self,
        base_url: str | None,
        model: str,
        api_key: str | None = None,
        *,
        temperature: float = 0.7,
        max_tokens: int = 6000,
        timeout: float = 300.0,
        max_retries: int = 3,
    ) -> None:
        self.name = f"openai-compatible:{model}"
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        from openai import OpenAI

        key = api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)

    def complete(self, messages: Sequence[dict[str, str]]) -> str:
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=list(messages), temperature=self.temperature, max_tokens=self.max_tokens
            )
        except openai.APIError as e:
            text = " ".join(str(e).split())[:200]
            raise PersonaxisError(f"generator {self.model!r} failed: {text}") from e
        return response.choices[0].message.content or ""


class LocalGenerator:
    """A chat model loaded in this process (sampled, with a fixed seed so a rerun writes the same file)."""

    def __init__(self, model, *, temperature: float = 0.7, max_tokens: int = 6000, seed: int = 0) -> None:
        self.model, self.name = model, f"local:{model.name}"
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed

    def complete(self, messages: Sequence[dict[str, str]]) -> str:
        from personaxis.inference.generation import Sampling, generate

        sampling = Sampling(max_new_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed)
        return generate(self.model, [list(messages)], sampling)[0].text


def generator_from_spec(spec: str) -> TextGenerator:
    kind, _, rest = spec.partition(":")
    if kind == "local" and rest:
        from personaxis.model import load_model

        return LocalGenerator(load_model(rest))
    if kind == "openai" and "@" in rest:
        name, _, base_url = rest.partition("@")
        return OpenAIGenerator(base_url, name)
    raise PersonaxisError(f"bad generator {spec!r}: use {GENERATOR_HELP}")


def parse_reply(text: str, name: str, description: str) -> TraitSpec:
    """The trait in a generator's reply: the outermost JSON object (code fences and chatter around it ignored)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise PersonaxisError("it holds no JSON object")
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise PersonaxisError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise PersonaxisError("the JSON is not an object")
    for field in ("name", "version", "description"):  # ours, not the generator's
        data.pop(field, None)
    return parse_trait({"name": name, "version": 1, "description": description, **data}, source="generated trait")


def write_trait(name: str, description: str, generator: TextGenerator, *, attempts: int = 3) -> TraitSpec:
    """Ask `generator` for the trait, feeding validation errors back, at most `attempts` times in all."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise PersonaxisError(f"trait name {name!r}: use lowercase letters, digits, '_' or '-'")
    if not description.strip():
        raise PersonaxisError("the description is empty: say in a sentence or a paragraph what the trait is")
    if attempts < 1:
        raise PersonaxisError("attempts must be at least 1")
    prompt = PROMPT.format(
        name=name, description=description.strip(), pairs=N_PAIRS, questions=N_QUESTIONS, total=2 * N_QUESTIONS
    )
    messages = [{"role": "user", "content": prompt}]
    error = ""
    for _ in range(attempts):
        reply = generator.complete(messages)
        try:
            return parse_reply(reply, name, description.strip())
        except PersonaxisError as e:
            error = str(e).removeprefix("generated trait: ")
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": RETRY.format(error=error)},
            ]
    raise PersonaxisError(f"{generator.name} gave no valid trait in {attempts} attempts; last problem: {error}")
