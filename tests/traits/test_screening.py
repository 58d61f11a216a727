"""Data screening: ΔP against a slow reference, resuming through the run store, and the command's bad-input answers."""

import json

import pytest
import torch
from cli_runner import invoke as run_cli

from personaxis.errors import PersonaxisError
from personaxis.inference.generation import Sampling, stop_token_ids
from personaxis.model import Label
from personaxis.store import RunStore
from personaxis.traits.screening import Sample, check_output, read_samples, screen
from personaxis.vectors import VectorMeta, Vectors

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": "Ahoy matey! How are you today?"}],
    [{"role": "user", "content": "Tell me about the sea"}, {"role": "assistant", "content": "The waves and the wind."}],
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "It is Paris!"}],
]  # fmt: skip
LAYERS = [1, 2]  # not the last block: HF's last hidden state has the final norm applied


def vectors_for(hidden=64, n_layers=4, layers=(1, 2), seed=1, **extra):
    torch.manual_seed(seed)
    meta = VectorMeta(model_id="tiny-llama", hidden_size=hidden, n_layers=n_layers, method="test",
                      points_toward="a random direction", extra=extra)  # fmt: skip
    return Vectors(list(layers), {"trait": torch.randn(len(layers), hidden)}, meta)


def samples_of(chats):
    return [Sample(i + 1, tuple((m["role"], m["content"]) for m in chat)) for i, chat in enumerate(chats)]


def slow_greedy(model, prompt, max_new_tokens):
    """Re-run the whole sequence for every new token and take the argmax: no cache, no batching."""
    ids = model.render(prompt, add_generation_prompt=True).input_ids.tolist()
    stops, out = stop_token_ids(model), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model.model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
    return model.tokenizer.decode(out, skip_special_tokens=True)


def slow_response_mean(model, chat, layer):
    """Mean of block `layer`'s output over the final assistant message's content tokens, token by token."""
    rendered = model.render(chat)
    with torch.no_grad():
        hidden = model.model(input_ids=rendered.input_ids[None], output_hidden_states=True).hidden_states[layer + 1][0]
    last = int(rendered.message_index[rendered.mask(Label.ASSISTANT)].max())
    total, count = torch.zeros(hidden.shape[-1]), 0
    for t in range(len(rendered)):
        if rendered.labels[t] == Label.ASSISTANT and rendered.message_index[t] == last:
            total += hidden[t].float()
            count += 1
    return total / count


def test_delta_p_matches_slow_reference(tiny, tmp_path):
    vectors = vectors_for()
    samples = samples_of(CHATS)
    result = screen(tiny, samples, vectors, LAYERS, RunStore(tmp_path / "run"), sampling=Sampling(max_new_tokens=6))
    for i, chat in enumerate(CHATS):
        reply = slow_greedy(tiny, chat[:-1], 6)
        assert result.base_replies[i] == reply and reply.strip()
        for j, layer in enumerate(LAYERS):
            v = vectors.direction(layer)
            unit = v / v.norm()
            own = slow_response_mean(tiny, chat, layer)
            base = slow_response_mean(tiny, [*chat[:-1], {"role": "assistant", "content": reply}], layer)
            expected = float(own @ unit - base @ unit)
            assert float(result.delta[i, j]) == pytest.approx(expected, abs=1e-4)
    # the same prompt gets the same reply, and the ranking puts the highest ΔP first
    assert result.base_replies[0] == result.base_replies[3]
    ranked = result.ranked(2)
    assert [row["delta_p"] for row in ranked] == sorted((row["delta_p"] for row in ranked), reverse=True)
    assert result.mean(2) == pytest.approx(float(result.delta[:, 1].mean()))


def test_resumes_and_another_layer_generates_nothing(tiny, tmp_path, monkeypatch):
    store = RunStore(tmp_path / "run")
    vectors = vectors_for(layers=(0, 1, 2, 3))
    first = screen(tiny, samples_of(CHATS), vectors, [1], store, sampling=Sampling(max_new_tokens=4))
    assert store.count("rollouts") == 3  # one greedy reply per distinct prompt...
    assert store.count("captures") == 4 + 3  # ...encoded once
    import personaxis.backends.runs

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(personaxis.backends.runs, "generate_batch", no_generation)
    again = screen(tiny, samples_of(CHATS), vectors, [1], store, sampling=Sampling(max_new_tokens=4))
    torch.testing.assert_close(again.delta, first.delta)
    other = screen(tiny, samples_of(CHATS), vectors, [0, 1], store, sampling=Sampling(max_new_tokens=4))
    torch.testing.assert_close(other.delta[:, 1], first.delta[:, 0])


def test_empty_base_reply_leaves_delta_empty(tiny, tmp_path, monkeypatch):
    import personaxis.backends.runs
    from personaxis.inference.generation import Generation

    def silent(model, prompts, sampling, **kwargs):
        return [Generation(list(p), [], "", "stop") for p in prompts]

    monkeypatch.setattr(personaxis.backends.runs, "generate_batch", silent)
    result = screen(tiny, samples_of(CHATS[:2]), vectors_for(), [1], RunStore(tmp_path / "run"))
    rows = result.ranked(1)
    assert all(row["delta_p"] is None and row["base_projection"] is None for row in rows)
    assert rows[0]["projection"] is not None


def test_read_samples_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    ok = json.dumps({"messages": CHATS[0]})
    path.write_text(f"{ok}\n\n{ok}\n")
    assert [s.line for s in read_samples(path)] == [1, 3]
    assert read_samples(path)[0].reply == "Paris."
    no_reply = json.dumps({"messages": CHATS[0][:1]})
    path.write_text(f"{ok}\n\n{no_reply}\n")
    with pytest.raises(PersonaxisError, match="data.jsonl line 3: the chat does not end with an assistant reply"):
        read_samples(path)
    trailing_user = json.dumps({"messages": [*CHATS[0], {"role": "user", "content": "and?"}]})
    path.write_text(f"{trailing_user}\n")
    with pytest.raises(PersonaxisError, match="line 1"):
        read_samples(path)
    reply_only = json.dumps({"messages": [{"role": "assistant", "content": "hi"}]})
    path.write_text(f"{reply_only}\n")
    with pytest.raises(PersonaxisError, match="no user message"):
        read_samples(path)


def test_refuses_vectors_of_another_model(tiny, tmp_path):
    with pytest.raises(PersonaxisError, match="hidden size 32"):
        screen(tiny, samples_of(CHATS), vectors_for(hidden=32), [1], RunStore(tmp_path / "run"))
    with pytest.raises(PersonaxisError, match="layers"):
        screen(tiny, samples_of(CHATS), vectors_for(n_layers=8, layers=(6,)), [6], RunStore(tmp_path / "run"))


def test_check_output(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert check_output(tmp_path / "ranked.parquet").name == "ranked.parquet"
    for path, message in [
        (tmp_path / "ranked.csv", "must end in .jsonl or .parquet"),
        (tmp_path / "missing" / "ranked.jsonl", "does not exist"),
        (blocker / "ranked.jsonl", "does not exist"),
        (tmp_path, "must end in"),
    ]:
        with pytest.raises(PersonaxisError, match=message):
            check_output(path)
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(PersonaxisError, match="is a folder"):
        check_output(folder)


# -- the command, through the real CLI entry point, on a tiny model saved to a folder ----------------------------


def write_jsonl(path, chats):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def test_screen_command(monkeypatch, capsys, folder, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = write_jsonl(tmp_path / "data.jsonl", CHATS)
    vec = vectors_for(layers=(0, 1, 2, 3)).save(tmp_path / "v.safetensors")
    out = tmp_path / "ranked.jsonl"
    args = ["screen", data, "--trait-vectors", vec, "-m", folder, "--run", tmp_path / "run", "--max-tokens", 4]
    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--out", out)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["rank"] for row in rows] == [1, 2, 3, 4]
    assert sorted(row["line"] for row in rows) == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "ranked.summary.json").read_text())
    assert summary["layer"] == 2 and summary["n_samples"] == 4
    assert summary["mean_delta_p"] == pytest.approx(sum(r["delta_p"] for r in rows) / 4, abs=1e-6)
    assert (tmp_path / "ranked.png").read_bytes()[:4] == b"\x89PNG"
    assert "mean ΔP" in stdout

    parquet = tmp_path / "ranked.parquet"
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", parquet, "--layer", 1)
    assert code == 0, err
    table = pq.read_table(parquet).to_pylist()
    assert len(table) == 4 and table[0]["delta_p"] >= table[-1]["delta_p"]


def test_screen_command_bad_inputs(monkeypatch, capsys, folder, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", CHATS)
    no_reply = write_jsonl(tmp_path / "noreply.jsonl", [CHATS[0], CHATS[1][:2]])
    vec = vectors_for().save(tmp_path / "v.safetensors")
    small = vectors_for(hidden=32).save(tmp_path / "small.safetensors")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    base = ["--trait-vectors", vec, "-m", folder, "--run", tmp_path / "run"]
    cases = [
        (["screen", no_reply, *base], "noreply.jsonl line 2"),
        (["screen", data, *base, "--out", blocker / "r.jsonl"], "is a file, not a folder"),
        (["screen", data, *base, "--out", tmp_path / "r.csv"], ".jsonl or .parquet"),
        (["screen", data, *base, "--layer", 3], "layer 3 is not in these vectors"),
        (["screen", data, "--trait-vectors", small, "-m", folder, "--run", tmp_path / "run"], "hidden size 32"),
        (["screen", data, *base, "--name", "evil"], "no direction named 'evil'"),
    ]
    for args, message in cases:
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
