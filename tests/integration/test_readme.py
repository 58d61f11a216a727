"""README.md's Python example runs as written, on the real embedded model, beside the file the README's
`personaxis extract` line makes (made here with the same library call)."""

import re
from pathlib import Path

import pytest

import personaxis as px

pytestmark = pytest.mark.integration

POSITIVE = [
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Arr, ahoy matey! What brings ye aboard?"}],
]  # fmt: skip
NEGATIVE = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello! How can I help you today?"}],
]


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).parents[2] / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    model = px.load_model("default")
    px.mean_difference(model, POSITIVE, NEGATIVE, range(model.n_layers)).save(tmp_path / "trait.safetensors")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    reply, _, shape = printed.rpartition(" torch.Size(")
    assert reply.strip() and re.fullmatch(r"\[1, \d+, 1\]\)", shape), printed  # one chat, its tokens, one layer
