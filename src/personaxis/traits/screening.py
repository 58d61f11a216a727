"""Data screening: which training samples would push a model toward a trait (persona vectors, Chen et al. 2025).

For a sample (x, y), a prompt x and the reply y a dataset would teach, the score is
``ΔP = (r̄_L(x, y) − r̄_L(x, y')) · v̂_L``: r̄_L is the mean of the residual stream at layer L over the reply's tokens,
y' is the model's own greedy reply to x and v̂_L the unit trait direction. ΔP measures how much further along the
trait the sample's reply sits than what the model would have said anyway, so high-ΔP samples are the ones expected to
move the model toward the trait when trained on; the dataset's mean ΔP scores the whole set.

Both stages go through the run store and resume: y' is generated as text only (the same greedy reply serves every
layer, so screening again at another layer generates nothing), then (x, y) and (x, y') are encoded through the same
chat template, so both sides of the difference are tokenized alike.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personaxis.errors import PersonaxisError

if TYPE_CHECKING:
    import torch

    from personaxis.inference.generation import Sampling
    from personaxis.model import ChatModel
    from personaxis.store import RunStore
    from personaxis.vectors import Vectors
    from personaxis.vllm import VLLMModel

OUTPUT_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Sample:
    """One chat to screen: everything before its final assistant message is the prompt x, that message is y."""

    line: int
    messages: tuple[tuple[str, str], ...]  # (role, content)

    @property
    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    @property
    def prompt(self) -> list[dict[str, str]]:
        return self.chat[:-1]

    @property
    def reply(self) -> str:
        return self.messages[-1][1]


def read_samples(path: str | os.PathLike[str]) -> list[Sample]:
    """Chats from JSONL that each end with a non-empty assistant reply; a line that does not stops everything."""
    from personaxis.common.datasets import read_chats

    path = Path(path)
    chats = read_chats(path)
    with path.open(encoding="utf-8") as f:
        lines = [number for number, line in enumerate(f, start=1) if line.strip()]  # read_chats skips the same
    samples = []
    for line, chat in zip(lines, chats, strict=True):
        if chat[-1]["role"] != "assistant" or not chat[-1]["content"].strip():
            raise PersonaxisError(f"{path.name} line {line}: the chat does not end with an assistant reply to screen")
        if not any(m["role"] == "user" for m in chat[:-1]):
            raise PersonaxisError(f"{path.name} line {line}: the reply has no user message before it")
        samples.append(Sample(line, tuple((m["role"], m["content"]) for m in chat)))
    return samples


@dataclass
class Screening:
    """Projections of every sample's reply and of the model's own reply, per layer; ΔP is their difference."""

    samples: list[Sample]
    layers: list[int]
    sample_projection: torch.Tensor  # [N, L] r̄(x, y) · v̂
    base_projection: torch.Tensor  # [N, L] r̄(x, y') · v̂, NaN where the model's own reply was empty
    base_replies: list[str]

    @property
    def delta(self) -> torch.Tensor:
        """[N, L] ΔP (NaN where the model gave no reply to compare with)."""
        return self.sample_projection - self.base_projection

    def column(self, layer: int) -> int:
        if layer not in self.layers:
            raise PersonaxisError(f"layer {layer} was not screened (screened: {self.layers})")
        return self.layers.index(layer)

    def mean(self, layer: int) -> float:
        """The dataset score: mean ΔP over the samples that have one."""
        return float(self.delta[:, self.column(layer)].nanmean())

    def ranked(self, layer: int) -> list[dict[str, Any]]:
        """One row per sample, highest ΔP first; samples without a ΔP come last with `delta_p` None."""
        j = self.column(layer)
        rows = []
        for i, sample in enumerate(self.samples):
            delta = float(self.delta[i, j])
            rows.append(
                {
                    "line": sample.line,
                    "delta_p": delta if math.isfinite(delta) else None,
                    "projection": float(self.sample_projection[i, j]),
                    "base_projection": _finite(float(self.base_projection[i, j])),
                    "prompt": next(c for r, c in reversed(sample.messages[:-1]) if r == "user"),
                    "reply": sample.reply,
                    "base_reply": self.base_replies[i],
                }
            )
        rows.sort(key=lambda row: -row["delta_p"] if row["delta_p"] is not None else math.inf)
        return [{"rank": k + 1, **row} for k, row in enumerate(rows)]


def screen(
    model: ChatModel,
    samples: Sequence[Sample],
    vectors: Vectors,
    layers: Sequence[int],
    store: RunStore,
    *,
    name: str | None = None,
    sampling: Sampling | None = None,
    batch_size: int = 8,
    generator: VLLMModel | None = None,
    progress: bool = False,
) -> Screening:
    """Score `samples` at `layers`; greedy replies and captures are read from `store` when already there. The replies
    y' come from `generator` when given (vLLM), else from `model`; the captures always from `model`."""
    import torch

    from personaxis.backends.runs import LocalBackend, Rollout, run_captures, run_rollouts
    from personaxis.inference.generation import Sampling

    if not samples:
        raise PersonaxisError("no samples to screen")
    vectors.validate(model)
    layers = list(layers)
    units = torch.stack([vectors.unit(layer, name) for layer in layers])  # [L, H]
    sampling = sampling or Sampling(max_new_tokens=256)

    prompts = {sample.messages[:-1]: f"p{k}" for k, sample in enumerate(samples)}  # one reply per distinct prompt
    rollouts = [Rollout.make(pid, [{"role": r, "content": c} for r, c in x], sampling) for x, pid in prompts.items()]
    backend = LocalBackend(generator or model, [], batch_size=batch_size)
    generated = run_rollouts(store, rollouts, backend, progress=progress)
    replies = {r.id: generated[r.id].data["text"] for r in rollouts}

    chats = {f"s{i}": s.chat for i, s in enumerate(samples)}
    chats.update({r.id: [*r.chat, {"role": "assistant", "content": replies[r.id]}]
                  for r in rollouts if replies[r.id].strip()})  # fmt: skip
    means = run_captures(store, model, chats, layers, ("response",), batch_size=batch_size, progress=progress)

    def projection(chat_id: str) -> torch.Tensor:
        if chat_id not in means:  # the model's own reply was empty: nothing to compare with
            return torch.full((len(layers),), float("nan"))
        return (means[chat_id].tensors["response"].float() * units).sum(dim=-1)

    base = [prompts[s.messages[:-1]] for s in samples]
    return Screening(
        samples=list(samples),
        layers=layers,
        sample_projection=torch.stack([projection(f"s{i}") for i in range(len(samples))]),
        base_projection=torch.stack([projection(pid) for pid in base]),
        base_replies=[replies[pid] for pid in base],
    )


# -- outputs ---------------------------------------------------------------------------------------------------


def check_output(path: Path, suffixes: Sequence[str] = OUTPUT_SUFFIXES) -> Path:
    """Refuse an output path before any work is done, rather than after an hour of generation."""
    if path.suffix not in suffixes:
        raise PersonaxisError(f"{path}: the output must end in {' or '.join(suffixes)}")
    folder = path.expanduser().absolute().parent
    if not folder.is_dir():
        raise PersonaxisError(f"cannot write {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise PersonaxisError(f"cannot write {path}: it is a folder")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PersonaxisError(f"cannot write {path}: permission denied")
    return path


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """JSONL or Parquet by the extension, written atomically."""
    from personaxis.store import atomic_write_bytes, atomic_write_text

    if path.suffix == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PersonaxisError("writing Parquet needs pyarrow (pip install pyarrow); or write .jsonl") from None
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def plot_histogram(values: Sequence[float], path: Path, title: str) -> None:
    """A histogram of ΔP with its mean marked, as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from personaxis.store import atomic_write_bytes

    finite = [v for v in values if v is not None and math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(finite, bins=min(40, max(5, len(finite) // 3)), color="#4c72b0")
    if finite:
        mean = sum(finite) / len(finite)
        ax.axvline(mean, color="#c44e52", linestyle="--", label=f"mean {mean:.3g}")
        ax.legend()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(xlabel="ΔP (projection of the sample's reply minus the model's own)", ylabel="samples", title=title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def write_outputs(result: Screening, layer: int, out: Path, about: dict[str, Any]) -> tuple[Path, Path]:
    """Write the ranked samples to `out`, their ΔP histogram beside it (.png) and a summary (.summary.json).

    `about` says what was screened (data, vectors, direction, model, settings); it is stored in the summary as given.
    Returns the histogram's and the summary's paths.
    """
    from personaxis.store import atomic_write_text

    rows = result.ranked(layer)
    write_rows(rows, out)
    png, summary = out.with_suffix(".png"), out.with_suffix(".summary.json")
    title = f"{about.get('direction', 'trait')} at layer {layer}: {len(rows)} samples"
    plot_histogram([row["delta_p"] for row in rows], png, title)
    missing = sum(row["delta_p"] is None for row in rows)
    record = {**about, "layer": layer, "n_samples": len(rows), "n_without_base_reply": missing,
              "mean_delta_p": _finite(result.mean(layer)), "ranked": str(out), "histogram": str(png)}  # fmt: skip
    atomic_write_text(summary, json.dumps(record, indent=2) + "\n")
    return png, summary
