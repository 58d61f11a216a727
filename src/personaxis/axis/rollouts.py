"""What a build generates: every role, the default Assistant and each trait's two sides, as seeded `Rollout`s.

The stage name and the per-sample seed live here, below the pipelines, because every stage that reads a build's
rollouts (calibration pools them) or seeds its own samples (drift) uses them too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personaxis.axis.library import DEFAULT_ROLE, AxisTrait, Role
from personaxis.backends.runs import Rollout
from personaxis.inference.generation import Sampling
from personaxis.model.embedded import resolve_embedded
from personaxis.model.loading import ChatModel

if TYPE_CHECKING:
    from personaxis.axis.build import BuildConfig

ROLLOUT_STAGE = "rollouts"
CAPTURES = ("response",)  # captured at every layer


def self_name(model: ChatModel) -> str:
    """What the model would call itself: the embedded model's title, else the last part of its id."""
    embedded = resolve_embedded(model.name)
    return embedded.title if embedded else Path(model.name.rstrip("/")).name


def sample_seed(run_seed: int, sample_id: str) -> int:
    """A per-sample seed: reproducible, independent of batching and order, different for every sample."""
    return int(hashlib.sha256(f"{run_seed}:{sample_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _chat(system: str | None, question: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": question}
    ]


def plan_rollouts(
    config: BuildConfig,
    roles: Sequence[Role],
    default_prompts: Sequence[str | None],
    questions: Sequence[str],
    traits: Sequence[AxisTrait],
) -> list[Rollout]:
    """Every role × its prompts × questions × samples, the default set likewise, and each trait's two sides."""
    base = Sampling(max_new_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p)
    out: list[Rollout] = []

    def add(sample_id: str, system: str | None, q: int, **labels: Any) -> None:
        for k in range(config.samples):
            rid = f"{sample_id}/q{q}/s{k}"
            sampling = replace(base, seed=sample_seed(config.seed, rid))
            out.append(Rollout.make(rid, _chat(system, questions[q]), sampling, question=q, sample=k, **labels))

    for role in roles:
        for p, system in enumerate(role.prompts):
            for q in range(len(questions)):
                add(f"role/{role.name}/p{p}", system, q, kind="role", role=role.name, prompt=p)
    for p, system in enumerate(default_prompts):
        for q in range(len(questions)):
            add(f"default/p{p}", system, q, kind="default", role=DEFAULT_ROLE, prompt=p)
    for trait in traits:
        for side in ("pos", "neg"):
            for p, system in enumerate(getattr(trait, side)):
                for q in range(len(questions)):
                    add(f"trait/{trait.name}/{side}{p}", system, q, kind="trait", trait=trait.name, side=side, prompt=p)
    return out
