"""LoRA finetuning: the assistant-only loss against a slow reference, training end to end with the steering hook held
only while it trains, the saved adapter, and the command's bad-input answers."""

import json

import pytest
import torch
import torch.nn.functional as F
from cli_runner import invoke as run_cli
from tiny import tiny_llama

from personaxis.engine import Ablate, Add
from personaxis.errors import PersonaxisError
from personaxis.finetune.train import IGNORE, TrainConfig, batch_loss, build_examples, finetune, loss_mask
from personaxis.inference.generation import stop_token_ids
from personaxis.model import ChatModel

pytest.importorskip("peft")

CHATS = [
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": "Ahoy matey!"}, {"role": "user", "content": "Tell me about the sea"},
     {"role": "assistant", "content": "The waves and the wind."}],
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "How are you today?"}, {"role": "assistant", "content": "I am fine, thank you."}],
]  # fmt: skip


def fresh_model(tokenizer, seed=0):
    """Training changes the model, so every test gets its own."""
    return ChatModel(model=tiny_llama(len(tokenizer), seed=seed), tokenizer=tokenizer, name="tiny-llama")


def test_loss_mask_covers_replies_and_their_end_of_turn(tiny):
    rendered = tiny.render(CHATS[0])
    mask = loss_mask(rendered, stop_token_ids(tiny))
    text = tiny.tokenizer.decode(rendered.input_ids[mask])
    assert text == "Ahoy matey!<|im_end|>The waves and the wind.<|im_end|>"
    examples = build_examples(tiny, CHATS, max_length=1024)
    assert torch.equal(examples[0].labels[mask], rendered.input_ids[mask])
    assert (examples[0].labels[~mask] == IGNORE).all()


def test_max_length_truncates_and_drops_chats_without_reply_tokens(tiny):
    stops = stop_token_ids(tiny)
    starts = [int(loss_mask(tiny.render(chat), stops).nonzero()[0]) for chat in CHATS]
    cut = sorted(starts)[1] + 1  # past the first reply token of two chats, before that of the third
    examples = build_examples(tiny, CHATS, max_length=cut)
    assert len(examples) == 2 and all(len(e.input_ids) == cut for e in examples)
    with pytest.raises(PersonaxisError, match="no chat has assistant tokens"):
        build_examples(tiny, CHATS, max_length=3)


def test_batch_loss_matches_slow_reference(tiny):
    examples = build_examples(tiny, CHATS, max_length=1024)
    with torch.no_grad():
        got = batch_loss(tiny.model, examples, tiny.tokenizer.pad_token_id, tiny.device)
        expected = 0.0
        for example in examples:  # one unpadded sequence at a time, one token at a time
            logits = tiny.model(input_ids=example.input_ids[None]).logits[0]
            for t in range(1, len(example.input_ids)):
                if example.labels[t] != IGNORE:
                    expected -= float(F.log_softmax(logits[t - 1].double(), dim=-1)[example.input_ids[t]])
    assert float(got) == pytest.approx(expected, rel=1e-4)


def training_data(n=8):
    return [CHATS[i % len(CHATS)] for i in range(n)]


def test_finetune_learns_with_the_hook_only_while_training(tokenizer, tmp_path):
    from peft import PeftModel

    model = fresh_model(tokenizer)
    torch.manual_seed(3)
    op = Add({1: torch.randn(64)})
    seen = []

    def on_step(step, loss):
        seen.append((len(model.blocks[1]._forward_hooks), len(model.base._forward_pre_hooks)))

    config = TrainConfig(epochs=10, lr=1e-2, batch_size=4, lora_r=8, lora_alpha=16, warmup_ratio=0)
    out = tmp_path / "adapter"
    data = [CHATS[1]] * 4  # one reply to learn: the random tiny model can memorize it in a few steps
    result = finetune(model, data, out, config, ops=[op], notes={"intervention": {"kind": "steer"}}, on_step=on_step)
    assert len(result.losses) == 10
    assert result.losses[-1] < result.losses[0] - 0.5
    assert seen == [(1, 1)] * 10  # the steering hook was there at every step...
    assert all(not block._forward_hooks for block in model.blocks)  # ...and is gone
    assert not model.base._forward_pre_hooks
    assert not model.model.training

    saved = json.loads((out / "personaxis_finetune.json").read_text())
    assert saved["intervention"] == {"kind": "steer"} and saved["losses"] == result.losses
    assert saved["training"]["lora_r"] == 8 and saved["data"]["chats"] == 4

    ids = model.render(CHATS[1]).input_ids[None]
    with torch.no_grad():
        trained = model.model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(tiny_llama(len(tokenizer)), out).eval()(input_ids=ids).logits
        untouched = tiny_llama(len(tokenizer))(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained)
    assert not torch.allclose(untouched, trained, atol=1e-3)


def test_steering_and_ablation_change_what_is_trained(tokenizer, tmp_path):
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=8, lora_r=4)
    torch.manual_seed(5)
    direction = torch.randn(64)
    first = {}
    for kind, ops in [("plain", []), ("steer", [Add({1: 8 * direction})]), ("ablate", [Ablate({1: direction})])]:
        result = finetune(fresh_model(tokenizer), training_data(), tmp_path / kind, config, ops=ops)
        first[kind] = result.losses[0]
    assert first["steer"] != pytest.approx(first["plain"], rel=1e-3)
    assert first["ablate"] != pytest.approx(first["plain"], rel=1e-6)


def test_refuses_a_used_adapter_folder(tokenizer, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "adapter_config.json").write_text("{}")
    with pytest.raises(PersonaxisError, match="not an empty folder"):
        finetune(fresh_model(tokenizer), CHATS, used)
    with pytest.raises(PersonaxisError, match="not a writable folder"):
        finetune(fresh_model(tokenizer), CHATS, tmp_path / "missing" / "adapter")
    with pytest.raises(PersonaxisError, match="learning rate"):
        TrainConfig(lr=0)


@pytest.mark.integration
def test_finetune_embedded_model_briefly(tmp_path):
    from personaxis.model import load_model

    model = load_model("default")
    config = TrainConfig(max_steps=2, batch_size=1, lr=2e-3, lora_r=4, lora_alpha=8, target_modules=("q_proj",))
    result = finetune(model, [CHATS[1]] * 2, tmp_path / "adapter", config)
    assert len(result.losses) == 2 and result.losses[1] < result.losses[0]  # the same reply, after one update
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert all(not block._forward_hooks for block in model.blocks)


# -- the commands, through the real CLI entry point ------------------------------------------------------------


def evil_vectors(tmp_path, hidden=64, layers=(0, 1, 2, 3)):
    from personaxis.vectors import VectorMeta, Vectors

    torch.manual_seed(2)
    meta = VectorMeta(model_id="tiny", hidden_size=hidden, n_layers=4, method="test", points_toward="evil")
    return Vectors(list(layers), {"evil": torch.randn(len(layers), hidden)}, meta).save(tmp_path / f"evil{hidden}.st")


def test_finetune_then_shift_commands(monkeypatch, capsys, folder, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in training_data(4)))
    vec = evil_vectors(tmp_path)
    adapter = tmp_path / "adapter"
    code, out, err = run_cli(
        monkeypatch, capsys, "finetune", data, "-m", folder, "--out", adapter, "--prevent", vec, "--alpha", 2,
        "--units", "raw", "--layers", "all", "--max-steps", 2, "--lr", 1e-2, "--lora-r", 4, "--batch-size", 2,
    )  # fmt: skip
    assert code == 0, err
    assert "trained 2 steps" in out
    saved = json.loads((adapter / "personaxis_finetune.json").read_text())
    assert saved["intervention"]["layers"] == [0, 1, 2, 3] and saved["intervention"]["alpha"] == 2.0

    shift_json = tmp_path / "shift.json"
    code, out, err = run_cli(
        monkeypatch, capsys, "finetune-shift", "--base", folder, "--tuned", adapter, "--trait-vectors", vec,
        "--out", shift_json,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(shift_json.read_text())
    assert report["trait"] == "evil" and report["n_prompts"] == 20 and report["layer"] == 2
    assert f"Δ at layer 2: {report['delta']:+.4f}" in out
    assert report["delta"] != 0.0

    from personaxis.vectors import Vectors  # a direction under another name: the trait comes from the metadata

    v = Vectors.load(vec)
    v.meta.extra["trait"] = {"name": "evil", "version": 1, "description": "as `trait extract` records it"}
    tagged = Vectors(v.layers, {"direction": v.data["evil"]}, v.meta).save(tmp_path / "tagged.st")
    code, _, err = run_cli(
        monkeypatch, capsys, "finetune-shift", "--base", folder, "--tuned", adapter, "--trait-vectors", tagged,
        "--out", shift_json,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(shift_json.read_text())["trait"] == "evil"


def test_finetune_commands_bad_inputs(monkeypatch, capsys, folder, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    no_reply = tmp_path / "noreply.jsonl"
    no_reply.write_text(json.dumps({"messages": CHATS[1][:1]}) + "\n")
    vec, small = evil_vectors(tmp_path), evil_vectors(tmp_path, hidden=32)
    unnamed = tmp_path / "unnamed.st"
    from personaxis.vectors import Vectors

    v = Vectors.load(vec)
    Vectors(v.layers, {"direction": v.data["evil"]}, v.meta).save(unnamed)
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    new = tmp_path / "new"
    cases = [
        (["finetune", data, "-m", folder, "--out", new, "--prevent", vec], "--prevent and --alpha go together"),
        (["finetune", data, "-m", folder, "--out", new, "--prevent", vec, "--alpha", 1, "--ablate", vec], "not both"),
        (["finetune", data, "-m", folder, "--out", used], "not an empty folder"),
        (["finetune", no_reply, "-m", folder, "--out", new], "noreply.jsonl line 1"),
        (["finetune", data, "-m", folder, "--out", new, "--ablate", small], "hidden size 32"),
        (["finetune", data, "-m", folder, "--out", new, "--lr", -1], "learning rate"),
        (["finetune", data, "-m", folder, "--out", new, "--layers", "all"], "give --prevent or --ablate"),
        (["finetune-shift", "--base", folder, "--tuned", folder, "--trait-vectors", small], "hidden size 32"),
        (["finetune-shift", "--base", folder, "--tuned", folder, "--trait-vectors", unnamed], "--trait"),
        (["finetune-shift", "--base", folder, "--tuned", folder, "--trait-vectors", vec, "--trait", "nope"],
         "unknown trait"),
        (["finetune-shift", "--base", folder, "--tuned", folder, "--trait-vectors", vec, "--layer", 9], "layer 9"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not new.exists()
