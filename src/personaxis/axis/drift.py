"""Persona drift (science.md §2.5): how far each assistant turn of a conversation sits along the Assistant Axis.

The model answers every user turn of a conversation in order (scripted turns, or a simulated user that writes the
next message itself). Each finished conversation is then encoded once and, per assistant turn, the mean activation
over that turn's content tokens at the target layer is projected on â. Lower means further from the Assistant; the
paper finds therapy and philosophy conversations drifting down while coding and writing stay put.

Generation goes through `run_rollouts` one turn at a time across all conversations (each turn's prompt is the history
so far), so an interrupted run resumes at the turn it reached. A simulated conversation is stored whole once finished.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from personaxis.axis.evals.conversations import (
    Conversation,
    SimulatedUserPrompt,
    load_conversations,
    load_simulated_user,
)
from personaxis.axis.rollouts import sample_seed
from personaxis.axis.runfiles import DRIFT, PLOTS, axis_name, run_of, write_json
from personaxis.backends.runs import LocalBackend, Rollout, run_rollouts
from personaxis.errors import PersonaxisError
from personaxis.inference.capture import turn_means
from personaxis.inference.generation import Sampling, generate
from personaxis.inference.steering import default_layer
from personaxis.model.loading import ChatModel
from personaxis.store import RunStore, key
from personaxis.vectors import Vectors

if TYPE_CHECKING:
    from personaxis.vllm import VLLMModel

DRIFT_STAGE = "drift"
SIMULATED_STAGE = "drift_simulated"
AWAY = ("therapy", "philosophy")
STAY = ("coding", "writing")
DOMAINS = ("coding", "writing", "therapy", "philosophy")
USER_SAMPLING = Sampling(max_new_tokens=96, temperature=0.7, top_p=0.9)  # how a local simulated user writes

Chat = list[dict[str, str]]


@dataclass
class DriftResult:
    """One conversation: its messages and the projection of each assistant turn (None for an empty reply)."""

    id: str
    domain: str
    messages: Chat
    projections: list[float | None]
    ended_by_user: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def turn_projections(
    model: ChatModel, chat: Sequence[dict[str, str]], unit: torch.Tensor, layer: int
) -> list[float | None]:
    """Projection on `unit` of each assistant message's content-token mean at `layer`; None for an empty message."""
    assistant = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
    if not assistant:
        raise PersonaxisError("the conversation has no assistant turn")
    spoken = [i for i in assistant if chat[i]["content"].strip()]
    out: dict[int, float] = {}
    if spoken:
        means = turn_means(model, chat, [layer])[:, 0]  # [n_turns_with_content, H]
        if means.shape[0] != len(spoken):
            raise PersonaxisError(f"found {means.shape[0]} assistant turns with content, expected {len(spoken)}")
        values = means.float() @ unit.float()
        out = {i: float(v) for i, v in zip(spoken, values.tolist(), strict=True) if math.isfinite(v)}
    return [out.get(i) for i in assistant]


def run_scripted(
    model: ChatModel,
    conversations: Sequence[Conversation],
    unit: torch.Tensor,
    layer: int,
    store: RunStore,
    sampling: Sampling,
    *,
    seed: int = 0,
    batch_size: int = 8,
    generator: VLLMModel | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> list[DriftResult]:
    """Answer every scripted user turn in order (all conversations advance together) and project each reply.

    The replies come from `generator` when given (vLLM), else from `model`; the projections are read with `model`."""
    histories: dict[str, Chat] = {c.id: [] for c in conversations}
    backend = LocalBackend(generator or model, [layer], captures=("response",), batch_size=batch_size)
    for t in range(max(len(c.turns) for c in conversations)):
        batch = []
        for c in conversations:
            if t < len(c.turns):
                histories[c.id].append({"role": "user", "content": c.turns[t]})
                rid = f"{c.id}/t{t}"
                batch.append(
                    Rollout.make(
                        rid, histories[c.id], replace(sampling, seed=sample_seed(seed, rid)), conversation=c.id, turn=t
                    )
                )
        records = run_rollouts(store, batch, backend, stage=DRIFT_STAGE, progress=False)
        if progress:
            log(f"turn {t + 1}: {len(batch)} replies")
        for rollout in batch:
            histories[rollout.labels["conversation"]].append(
                {"role": "assistant", "content": records[rollout.id].data["text"]}
            )
    return [
        DriftResult(c.id, c.domain, histories[c.id], turn_projections(model, histories[c.id], unit, layer))
        for c in conversations
    ]


@dataclass(frozen=True)
class DriftConfig:
    """What `run_drift` does: which conversations, who writes the user turns, and how the model replies."""

    domains: tuple[str, ...] = ()  # () : every domain
    per_domain: int | None = None  # at most this many conversations per domain
    max_turns: int | None = None  # keep only the first N scripted user turns
    simulated_user: str | None = None  # local:same, local:MODEL or openai:MODEL@BASE_URL instead of the script
    turns: int = 10  # user turns per simulated conversation
    layer: int | None = None  # where to project; None: the axis's target layer
    max_tokens: int = 128
    temperature: float = 0.7
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad:
            raise PersonaxisError(f"unknown domain {bad[0]!r} (choose from {', '.join(DOMAINS)})")
        for flag, value in (("per-domain", self.per_domain), ("max-turns", self.max_turns)):
            if value is not None and value < 1:
                raise PersonaxisError(f"--{flag} must be at least 1, got {value}")
        if self.simulated_user and self.turns < 1:
            raise PersonaxisError(f"--turns must be at least 1, got {self.turns}")

    @property
    def sampling(self) -> Sampling:
        top_p = 0.9 if self.temperature > 0 else 1.0
        return Sampling(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=top_p)

    def choose(self, conversations: Sequence[Conversation]) -> list[Conversation]:
        """The conversations of the chosen domains, at most `per_domain` each, cut to `max_turns` user turns."""
        chosen = [c for c in conversations if not self.domains or c.domain in self.domains]
        if self.per_domain is not None:
            chosen = [c for d in DOMAINS for c in [x for x in chosen if x.domain == d][: self.per_domain]]
        if self.max_turns is not None:
            chosen = [c.model_copy(update={"turns": c.turns[: self.max_turns]}) for c in chosen]
        if not chosen:
            raise PersonaxisError("no conversation in the chosen domains")
        return chosen


@dataclass
class Drift:
    """What `run_drift` wrote: drift.json's content and its files."""

    data: dict[str, Any]  # model, axis, layer, mode, sampling, seed, stats, conversations
    results: list[DriftResult]
    files: dict[str, Path]


def run_drift(
    model: ChatModel,
    axis: Vectors,
    config: DriftConfig,
    *,
    axis_file: str | Path | None = None,
    run_dir: str | Path | None = None,
    conversations: Sequence[Conversation] | None = None,
    generator: VLLMModel | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Drift:
    """Project every assistant turn of the chosen conversations (default: the packaged set) on `axis` and write
    drift.json and its plot into `run_dir` (default: the build run folder holding `axis_file`)."""
    from personaxis.axis.plots import drift_trajectories

    if config.simulated_user and generator is not None:
        raise PersonaxisError(
            "--generator vllm runs the scripted conversations; a simulated user talks to the HF model"
        )
    if run_dir is None:
        if axis_file is None:
            raise PersonaxisError("drift needs a run folder (or the axis file inside a build's)")
        run_dir = run_of(axis_file)
    chosen = config.choose(load_conversations().conversations if conversations is None else conversations)
    layer = default_layer(axis) if config.layer is None else config.layer
    unit = axis.unit(layer, axis_name(axis))
    store, sampling = RunStore(run_dir), config.sampling
    if config.simulated_user:
        user = chat_backend(config.simulated_user, USER_SAMPLING, same=model)
        results = run_simulated(
            model, chosen, unit, layer, store, sampling, user, load_simulated_user(),
            turns=config.turns, seed=config.seed, log=log,
        )  # fmt: skip
        mode = f"simulated user {user.name}, up to {config.turns} user turns"
    else:
        results = run_scripted(
            model, chosen, unit, layer, store, sampling, seed=config.seed, batch_size=config.batch_size,
            generator=generator, log=log,
        )  # fmt: skip
        mode = "scripted user turns"
    data = {
        "model": model.name,
        "axis": None if axis_file is None else str(axis_file),
        "layer": layer,
        "mode": mode,
        "sampling": asdict(sampling),
        "seed": config.seed,
        "stats": drift_stats(results),
        "conversations": [asdict(r) for r in results],
    }
    run = Path(run_dir)
    files = {"json": write_json(run / DRIFT, data)}
    files["plot"] = drift_trajectories(run / PLOTS / "drift.png", data["conversations"], layer)
    return Drift(data, results, files)


# --- simulated users ----------------------------------------------------------------------------------------------


class ChatBackend(Protocol):
    """Anything that answers a chat: a local model or an OpenAI-compatible endpoint."""

    name: str

    def reply(self, messages: Chat) -> str: ...


class LocalChat:
    def __init__(self, model: ChatModel, sampling: Sampling) -> None:
        self.model, self.sampling, self.name = model, sampling, f"local:{model.name}"

    def reply(self, messages: Chat) -> str:
        return generate(self.model, [messages], self.sampling)[0].text


class OpenAIChat:
    def __init__(self, model: str, base_url: str, sampling: Sampling, api_key: str | None = None) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none")
        self.model, self.sampling, self.name = model, sampling, f"openai:{model}@{base_url}"

    def reply(self, messages: Chat) -> str:
        try:
            out = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=self.sampling.temperature,
                top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_new_tokens,
            )
        except Exception as err:  # network and API errors are the user's endpoint, not a bug here
            raise PersonaxisError(f"simulated user {self.name}: {' '.join(str(err).split())[:200]}") from None
        return out.choices[0].message.content or ""


def chat_backend(spec: str, sampling: Sampling, *, same: ChatModel | None = None) -> ChatBackend:
    """`local:same`, `local:MODEL` or `openai:MODEL@BASE_URL` (key from $OPENAI_API_KEY)."""
    kind, _, rest = spec.partition(":")
    if kind == "local" and rest:
        if rest == "same":
            if same is None:
                raise PersonaxisError("simulated user 'local:same' needs a studied model")
            return LocalChat(same, sampling)
        from personaxis.model import load_model

        return LocalChat(load_model(rest), sampling)
    if kind == "openai" and "@" in rest:
        name, _, url = rest.partition("@")
        return OpenAIChat(name, url, sampling)
    raise PersonaxisError(f"bad simulated user {spec!r}: use local:same, local:MODEL or openai:MODEL@BASE_URL")


def swap_roles(system: str, history: Chat) -> Chat:
    """The conversation as the simulated user sees it: its instructions, then the assistant's turns as user turns."""
    flipped = {"user": "assistant", "assistant": "user"}
    return [{"role": "system", "content": system}] + [
        {"role": flipped[m["role"]], "content": m["content"]} for m in history if m["role"] in flipped
    ]


def run_simulated(
    model: ChatModel,
    conversations: Sequence[Conversation],
    unit: torch.Tensor,
    layer: int,
    store: RunStore,
    sampling: Sampling,
    user: ChatBackend,
    prompt: SimulatedUserPrompt,
    *,
    turns: int,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> list[DriftResult]:
    """Each conversation opens with its scripted first turn; the simulated user writes the rest, up to `turns` user
    turns, until it answers with the end token."""
    if turns < 1:
        raise PersonaxisError(f"--turns must be at least 1, got {turns}")
    results = []
    for c in conversations:
        record_key = key(
            stage=SIMULATED_STAGE,
            model=model.name,
            dtype=str(model.dtype),
            user=user.name,
            template=prompt.template,
            conversation=c.model_dump(),
            turns=turns,
            sampling=asdict(sampling),
            seed=seed,
        )
        stored = store.get(SIMULATED_STAGE, record_key, tensors=False)
        if stored is None:
            history, ended = _simulate(model, c, sampling, user, prompt, turns, seed)
            store.put(SIMULATED_STAGE, record_key, {"id": c.id, "messages": history, "ended_by_user": ended})
        else:
            history, ended = stored.data["messages"], stored.data["ended_by_user"]
        log(f"{c.id}: {sum(m['role'] == 'assistant' for m in history)} turns" + (" (user ended)" if ended else ""))
        results.append(DriftResult(c.id, c.domain, history, turn_projections(model, history, unit, layer), ended))
    return results


def _simulate(
    model: ChatModel,
    c: Conversation,
    sampling: Sampling,
    user: ChatBackend,
    prompt: SimulatedUserPrompt,
    turns: int,
    seed: int,
) -> tuple[Chat, bool]:
    system = prompt.render(persona=c.persona, topic=c.topic, domain=c.domain)
    history: Chat = []
    for t in range(turns):
        message = c.turns[0] if t == 0 else user.reply(swap_roles(system, history)).strip()
        if t > 0 and (prompt.is_end(message) or not message):
            return history, True
        history.append({"role": "user", "content": message})
        turn_sampling = replace(sampling, seed=sample_seed(seed, f"{c.id}/sim{t}"))
        history.append({"role": "assistant", "content": generate(model, [history], turn_sampling)[0].text})
    return history, False


# --- statistics ---------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _slope(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares slope of projection against turn index: the drift per turn."""
    if len({t for t, _ in points}) < 2:
        return None
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    return sum((t - mt) * (v - mv) for t, v in points) / sum((t - mt) ** 2 for t, _ in points)


def _tests(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's t-test and the Mann-Whitney U test of a against b (two-sided)."""
    from scipy import stats

    out: dict[str, Any] = {"n": [len(a), len(b)], "mean": [_mean(a), _mean(b)]}
    if len(a) < 2 or len(b) < 2:
        return {**out, "welch_t": None, "welch_p": None, "mannwhitney_u": None, "mannwhitney_p": None}
    welch = stats.ttest_ind(a, b, equal_var=False)
    mw = stats.mannwhitneyu(a, b, alternative="two-sided")
    return {
        **out,
        "welch_t": float(welch.statistic),
        "welch_p": float(welch.pvalue),
        "mannwhitney_u": float(mw.statistic),
        "mannwhitney_p": float(mw.pvalue),
    }


def _spoken(result: DriftResult) -> list[tuple[str, float]]:
    """(reply, projection) of each assistant turn with content."""
    replies = [m["content"] for m in result.messages if m["role"] == "assistant"]
    return [(text, v) for text, v in zip(replies, result.projections, strict=False) if v is not None]


def drift_stats(results: Sequence[DriftResult], presents_as_ai: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Per-domain means and slopes; therapy+philosophy against coding+writing, per turn and per conversation.

    Turns of one conversation are not independent, so the per-conversation test (each conversation's mean turn) is
    the honest one; the per-turn test is reported beside it because it is what a reader will compute first.
    Replies that present themselves as an AI (`presents_as_ai`, by default the role rubric's patterns) are counted
    per domain, with the mean projection of those turns against the others: a model that answers one domain with
    disclaimers sits higher on the axis there for that reason alone.
    """
    if presents_as_ai is None:
        from personaxis.axis.library import load_role_rubric

        presents_as_ai = load_role_rubric().presents_as_ai
    flagged = [(r, [(presents_as_ai(text), v) for text, v in _spoken(r)]) for r in results]  # (is AI, projection)
    domains: dict[str, dict[str, Any]] = {}
    for domain in sorted({r.domain for r in results}):
        rows = [r for r in results if r.domain == domain]
        points = [(t, v) for r in rows for t, v in enumerate(r.projections) if v is not None]
        as_ai = [ai for r, turns in flagged if r.domain == domain for ai, _ in turns]
        domains[domain] = {
            "conversations": len(rows),
            "turns": len(points),
            "mean": _mean([v for _, v in points]),
            "slope_per_turn": _slope(points),
            "first_turn_mean": _mean([v for t, v in points if t == 0]),
            "last_turn_mean": _mean(
                [r.projections[-1] for r in rows if r.projections and r.projections[-1] is not None]
            ),
            "as_ai_share": sum(as_ai) / len(as_ai) if as_ai else None,
        }

    def turns_of(group: Sequence[str]) -> list[float]:
        return [v for r in results if r.domain in group for v in r.projections if v is not None]

    def conversations_of(group: Sequence[str]) -> list[float]:
        means = [_mean([v for v in r.projections if v is not None]) for r in results if r.domain in group]
        return [m for m in means if m is not None]

    def conversations_without_ai(group: Sequence[str]) -> list[float]:
        means = [_mean([v for ai, v in turns if not ai]) for r, turns in flagged if r.domain in group]
        return [m for m in means if m is not None]

    per_turn = _tests(turns_of(AWAY), turns_of(STAY))
    per_conversation = _tests(conversations_of(AWAY), conversations_of(STAY))
    means = per_turn["mean"]
    turns = [pair for _, pairs in flagged for pair in pairs]
    return {
        "domains": domains,
        "as_ai": {
            "turns": sum(ai for ai, _ in turns),
            "of": len(turns),
            "mean_projection": [_mean([v for ai, v in turns if ai]), _mean([v for ai, v in turns if not ai])],
            "per_conversation_without": _tests(conversations_without_ai(AWAY), conversations_without_ai(STAY)),
        },
        "groups": {"away": list(AWAY), "stay": list(STAY)},
        "per_turn": per_turn,
        "per_conversation": per_conversation,
        "paper_direction": None if None in means else means[0] < means[1],
    }


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def describe_stats(stats: dict[str, Any]) -> list[str]:
    """`drift_stats` in sentences: replies that speak as an AI, then the away-vs-stay tests per turn and per
    conversation."""
    ai, without = stats["as_ai"], stats["as_ai"]["per_conversation_without"]
    lines = [
        f"{ai['turns']} of {ai['of']} replies speak as an AI; mean projection {_fmt(ai['mean_projection'][0])} "
        f"against {_fmt(ai['mean_projection'][1])} for the others; per conversation without them: therapy+philosophy "
        f"{_fmt(without['mean'][0])} vs coding+writing {_fmt(without['mean'][1])} "
        f"(Welch p={_fmt(without['welch_p'], '.3g')})"
    ]
    for level in ("per_turn", "per_conversation"):
        t = stats[level]
        away, stay = _fmt(t["mean"][0]), _fmt(t["mean"][1])
        lines.append(
            f"{level.replace('_', ' ')}: therapy+philosophy {away} vs coding+writing {stay} "
            f"(Welch p={_fmt(t['welch_p'], '.3g')}, Mann-Whitney p={_fmt(t['mannwhitney_p'], '.3g')})"
        )
    return lines
