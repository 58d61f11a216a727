"""Writing a trait file with a generator LLM: JSON parsing, validation, and retries with the error fed back."""

import json

import pytest

from personaxis.errors import PersonaxisError
from personaxis.traits.generator import OpenAIGenerator, parse_reply, write_trait
from personaxis.traits.library import load_trait


def valid_body(n_pairs=5, n_questions=20):
    return {
        "instructions": [{"pos": f"Be very grumpy, variant {i}.", "neg": f"Be cheerful, variant {i}."}
                         for i in range(n_pairs)],
        "questions": {
            "extraction": [f"Extraction question number {i}?" for i in range(n_questions)],
            "evaluation": [f"Evaluation question number {i}?" for i in range(n_questions)],
        },
        "rubric": "How grumpy is this answer?\nQ: {question}\nA: {answer}\nReply with 0-100, or REFUSAL.",
    }  # fmt: skip


def test_parse_reply_takes_the_json_object_and_our_name():
    text = "Sure! Here it is:\n```json\n" + json.dumps({**valid_body(), "name": "other"}) + "\n```\nEnjoy."
    spec = parse_reply(text, "grumpy", "Grumpy and short-tempered.")
    assert spec.name == "grumpy" and spec.description == "Grumpy and short-tempered." and spec.version == 1
    with pytest.raises(PersonaxisError, match="no JSON object"):
        parse_reply("I cannot help with that.", "grumpy", "d")
    with pytest.raises(PersonaxisError, match="invalid JSON at line 1"):
        parse_reply('{"instructions": [}', "grumpy", "d")
    with pytest.raises(PersonaxisError, match=r"'questions.extraction' has 19 items, expected 20"):
        parse_reply(json.dumps(valid_body(n_questions=19)), "grumpy", "d")


def test_malformed_then_valid_over_an_openai_compatible_server(fake_openai, tmp_path):
    fake_openai.replies = ["Here you go: {'instructions': oops}", json.dumps(valid_body())]
    generator = OpenAIGenerator(fake_openai.url, "writer", "key")
    spec = write_trait("grumpy", "Grumpy and short-tempered.", generator)
    assert len(spec.instructions) == 5 and len(spec.questions.all) == 40
    first, second = fake_openai.requests
    assert len(first["messages"]) == 1 and "grumpy" in first["messages"][0]["content"]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == fake_openai.replies[0]
    assert "invalid JSON" in second["messages"][2]["content"]


def test_gives_up_after_the_attempts(fake_openai):
    fake_openai.replies = [json.dumps(valid_body(n_pairs=4))]
    generator = OpenAIGenerator(fake_openai.url, "writer", "key")
    with pytest.raises(PersonaxisError, match=r"no valid trait in 2 attempts; last problem: 'instructions' has 4"):
        write_trait("grumpy", "Grumpy.", generator, attempts=2)
    assert len(fake_openai.requests) == 2


def test_bad_names_and_descriptions():
    with pytest.raises(PersonaxisError, match="trait name 'Grumpy!'"):
        write_trait("Grumpy!", "d", generator=None)
    with pytest.raises(PersonaxisError, match="description is empty"):
        write_trait("grumpy", "  ", generator=None)


def test_cli_trait_new(fake_openai, tmp_path, cli):
    fake_openai.replies = ["not json", json.dumps(valid_body())]
    out = tmp_path / "grumpy.json"
    code, stdout, stderr = cli("trait", "new", "grumpy", "--description", "Grumpy.",
                               "--generator", f"openai:writer@{fake_openai.url}", "--out", out)  # fmt: skip
    assert code == 0, stderr
    assert load_trait(out).name == "grumpy"
    code, _, stderr = cli("trait", "new", "grumpy", "--description", "Grumpy.", "--generator", "x", "--out", out)
    assert code == 2 and "exists" in stderr
    code, _, stderr = cli("trait", "new", "grumpy", "--description", "G", "--generator", "bad", "--out", tmp_path / "b")
    assert code == 2 and "bad generator 'bad'" in stderr
