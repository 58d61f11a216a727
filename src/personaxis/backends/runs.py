"""Resumable pipeline stages: rollouts (generation with one-pass capture) and captures of finished chats.

Both pipelines (persona vectors, the Assistant Axis) are lists of samples pushed through these stages. A sample's
record lives in the run store under a content hash of everything that determines it (the model, the chat, the sampling
settings with their seed, the layers captured), so a rerun computes only what is missing and a changed setting makes
new records instead of overwriting old ones.

Where generation happens is a `Backend`: `LocalBackend` generates and captures in one pass on the local model; other
backends (several processes or machines, an OpenAI-compatible server plus a local capture pass) implement the same
`identity` / `stream` pair. Results stream back in small groups and are written as they arrive, so a killed run loses
at most the group in flight. `LocalBackend` also runs on vLLM: given a `personaxis.vllm.VLLMModel` it hands vLLM the
rollouts in groups and records the same means in the same pass, and its identity says so (vLLM's kernels and sampler
are not ours, so its samples never share a key with the HF runtime's).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from personaxis.common.progress import progress_bar
from personaxis.engine import Op
from personaxis.errors import PersonaxisError
from personaxis.inference.capture import AGGREGATIONS, iter_means
from personaxis.inference.generation import CAPTURES, Sampling, generate_batch, prompt_ids
from personaxis.model.loading import ChatModel
from personaxis.store import Record, RunStore, key

if TYPE_CHECKING:
    from personaxis.vllm import VLLMModel

ROLLOUT_VERSION = 1
VLLM_GROUP_BATCHES = 4


@dataclass(frozen=True)
class Rollout:
    """One reply to generate: the prompt chat, its sampling settings (seed included) and labels for later stages."""

    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, hashable
    sampling: Sampling
    labels: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def make(cls, id: str, messages: Sequence[dict[str, str]], sampling: Sampling, **labels: Any) -> Rollout:
        return cls(id, tuple((m["role"], m["content"]) for m in messages), sampling, labels)

    @property
    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class RolloutResult:
    rollout: Rollout
    text: str
    finish_reason: str
    n_tokens: int
    means: dict[str, torch.Tensor]  # capture name -> [L, H]


class Backend(Protocol):
    def identity(self) -> dict[str, Any]:
        """What, besides the sample itself, determines a result (model, revision, layers...): part of every key."""

    def stream(self, rollouts: Sequence[Rollout]) -> Iterator[list[RolloutResult]]:
        """Generate and capture `rollouts`, yielding results group by group in any order."""


class LocalBackend:
    """Generation and capture in one pass on a local model, batched by reply budget and prompt length.

    `model` is a `ChatModel` (the HF runtime) or a `personaxis.vllm.VLLMModel` (vLLM, which batches by itself).
    It applies no ops; `OpsBackend` is the same with ops (steering, capping) named in its identity.
    """

    def __init__(
        self,
        model: ChatModel | VLLMModel,
        layers: Sequence[int],
        captures: Sequence[str] = ("response",),
        batch_size: int = 8,
    ) -> None:
        self.model, self.layers, self.captures, self.batch_size = model, list(layers), tuple(captures), batch_size
        self.ops: list[Op] = []

    def identity(self) -> dict[str, Any]:
        identity = {
            "model": self.model.name,
            "revision": self.model.revision,
            "dtype": str(self.model.dtype),
            "layers": self.layers,
            "captures": self.captures,
        }
        if self.model.runtime != "hf":  # the HF runtime's keys stay what they always were
            identity["runtime"] = self.model.runtime
        return identity

    def stream(self, rollouts: Sequence[Rollout]) -> Iterator[list[RolloutResult]]:
        if self.model.runtime == "vllm":
            yield from self._stream_vllm(rollouts)
            return
        prompts = [prompt_ids(self.model, r.chat) for r in rollouts]
        sizes = [(r.sampling.max_new_tokens, len(p)) for r, p in zip(rollouts, prompts, strict=True)]
        for chunk in longest_first(sizes, self.batch_size):
            outs = generate_batch(
                self.model,
                [prompts[i] for i in chunk],
                [rollouts[i].sampling for i in chunk],
                ops=self.ops,
                capture_layers=self.layers or None,
                captures=self.captures,
            )
            yield [
                RolloutResult(rollouts[i], o.text, o.finish_reason, len(o.token_ids), o.means)
                for i, o in zip(chunk, outs, strict=True)
            ]

    def _stream_vllm(self, rollouts: Sequence[Rollout]) -> Iterator[list[RolloutResult]]:
        """vLLM schedules and batches by itself (`batch_size` sequences at once): it gets groups of several batches,
        large enough to keep it full, small enough that a killed run loses little."""
        group = VLLM_GROUP_BATCHES * self.batch_size
        for start in range(0, len(rollouts), group):
            chunk = rollouts[start : start + group]
            outs = self.model.generate(
                [r.chat for r in chunk],
                [r.sampling for r in chunk],
                ops=self.ops,
                capture_layers=self.layers or None,
                captures=self.captures,
            )
            yield [
                RolloutResult(r, o.text, o.finish_reason, len(o.token_ids), o.means)
                for r, o in zip(chunk, outs, strict=True)
            ]


class OpsBackend(LocalBackend):
    """A `LocalBackend` that applies `ops` to every rollout while generating.

    `described` says what the ops are (e.g. ``{"steer": {...}}`` or ``{"cap": ...}``) and joins the backend identity,
    hence every record key: an op's reply and a plain one to the same chat are different samples and never overwrite
    each other. Two backends whose ops differ must describe them differently.
    """

    def __init__(
        self,
        model: ChatModel | VLLMModel,
        ops: Sequence[Op],
        described: Mapping[str, Any],
        layers: Sequence[int] = (),
        captures: Sequence[str] = ("response",),
        batch_size: int = 8,
    ) -> None:
        super().__init__(model, layers, captures, batch_size)
        self.ops = list(ops)
        self.described = dict(described)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), **self.described}


def longest_first(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices in batches, from each rollout's (reply budget, prompt length): the largest budgets first, then the
    longest prompts. A batch decodes until its longest budget and pads to its longest prompt, so like rows go
    together; the largest come first so that a batch that does not fit in memory fails at the start of a long job,
    not at its end, and the estimate of the time left errs long rather than short."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i], reverse=True)  # stable: ties keep their order
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def check_backend(backend: Backend, model: ChatModel, layers: Sequence[int], captures: Sequence[str]) -> None:
    """A backend handed to a pipeline must capture what the stage needs (these layers and captures of this model):
    the artifacts are computed from its records with the pipeline's own model."""
    identity = backend.identity()
    given = {
        "model": identity.get("model"),
        "layers": list(identity.get("layers", [])),
        "captures": list(identity.get("captures", [])),
    }
    needed = {"model": model.name, "layers": list(layers), "captures": list(captures)}
    wrong = [f"{k} {given[k]} (needed: {needed[k]})" for k in needed if given[k] != needed[k]]
    if wrong:
        raise PersonaxisError(f"the backend was made for other settings than this stage: {'; '.join(wrong)}")


def rollout_key(backend_identity: dict[str, Any], rollout: Rollout) -> str:
    """The sample's id is part of its identity: two samples with the same chat and seed stay two records, each
    carrying its own id and labels."""
    return key(
        stage="rollout",
        version=ROLLOUT_VERSION,
        id=rollout.id,
        backend=backend_identity,
        messages=rollout.messages,
        sampling=asdict(rollout.sampling),
    )


def run_rollouts(
    store: RunStore,
    rollouts: Sequence[Rollout],
    backend: Backend,
    *,
    stage: str = "rollouts",
    progress: bool = True,
) -> dict[str, Record]:
    """Generate what is missing, write each result atomically, and return {rollout id: record} for all of them."""
    identity = backend.identity()
    keys = {r.id: rollout_key(identity, r) for r in rollouts}
    if len(keys) != len(rollouts):
        raise PersonaxisError("rollout ids must be unique")
    todo = set(store.pending(stage, keys.values()))
    pending = [r for r in rollouts if keys[r.id] in todo]
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{stage} ({len(rollouts) - len(pending)} done before)", total=len(pending))
        for results in backend.stream(pending) if pending else ():
            store.put_many(
                stage,
                [
                    (
                        keys[r.rollout.id],
                        {
                            "id": r.rollout.id,
                            "text": r.text,
                            "finish_reason": r.finish_reason,
                            "n_tokens": r.n_tokens,
                            "labels": r.rollout.labels,
                        },
                        r.means,
                    )
                    for r in results
                ],
            )
            bar.advance(task, len(results))
    return _read(store, stage, keys)


def capture_key(
    model: ChatModel, chat: Sequence[dict[str, str]], layers: Sequence[int], aggregations: Sequence[str]
) -> str:
    return key(
        stage="capture",
        model=model.name,
        revision=model.revision,
        dtype=str(model.dtype),
        chat=[(m["role"], m["content"]) for m in chat],
        layers=list(layers),
        aggregations=list(aggregations),
    )


def run_captures(
    store: RunStore,
    model: ChatModel,
    chats: dict[str, Sequence[dict[str, str]]],
    layers: Sequence[int],
    aggregations: Sequence[str] = AGGREGATIONS,
    *,
    stage: str = "captures",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Record]:
    """Span means of finished chats ({id: chat}), computed once per (model, chat, layers) and kept in the store."""
    keys = {cid: capture_key(model, chat, layers, aggregations) for cid, chat in chats.items()}
    todo = set(store.pending(stage, keys.values()))
    ids = [cid for cid in chats if keys[cid] in todo]
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{stage} ({len(chats) - len(ids)} done before)", total=len(ids))
        batches = iter_means(model, [chats[c] for c in ids], layers, aggregations, batch_size=batch_size)
        for chunk, means in batches if ids else ():
            store.put_many(
                stage,
                [
                    (keys[ids[i]], {"id": ids[i]}, {name: means[j, a] for a, name in enumerate(aggregations)})
                    for j, i in enumerate(chunk)
                ],
            )
            bar.advance(task, len(chunk))
    return _read(store, stage, keys)


def _read(store: RunStore, stage: str, keys: dict[str, str]) -> dict[str, Record]:
    """All records of the stage; if a backend gave up on some samples (e.g. failed requests), one clear error."""
    out, missing = {}, []
    for sample_id, k in keys.items():
        record = store.get(stage, k)
        if record is None:
            missing.append(sample_id)
        else:
            out[sample_id] = record
    if missing:
        raise PersonaxisError(
            f"{stage}: {len(missing)} of {len(keys)} samples got no result (first: {missing[0]}); the other results"
            " are stored: run again to retry the missing ones"
        )
    return out


__all__ = [
    "CAPTURES",
    "Backend",
    "LocalBackend",
    "OpsBackend",
    "Rollout",
    "RolloutResult",
    "check_backend",
    "run_captures",
    "run_rollouts",
]
