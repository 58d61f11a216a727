"""What every judge backend shares: the cache, the counters and the scoring/classifying front.

A backend implements one method, `_number_probs(prompts, hi)`: for each prompt, the judge's probability of answering
each integer ``0..hi`` (see `Distribution`). Everything else (the 0–100 score rule, classification over numbered
options, caching, statistics) is built on that here, identically for remote and local judges.

The cache stores distributions, not final scores, so the mass threshold can change without asking the judge again.
Its key is the judge id, the full prompt text (which contains the rubric, the question and the answer) and `hi`.
Failed calls are never cached, so a later run retries them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from personaxis.judge.prompts import classify_prompt, coherence_prompt, trait_prompt
from personaxis.judge.scoring import (
    MIN_MASS,
    ClassifyResult,
    Distribution,
    ScoreResult,
    classify_from,
    score_from,
)
from personaxis.store import RunStore, key

CACHE_STAGE = "judge"
_PROTOCOL = 1  # bump when the meaning of a cached distribution changes


@dataclass
class JudgeStats:
    """Running counts, so a pipeline can report how many judgements were undefined or failed."""

    prompts: int = 0  # prompts asked for (cached or not)
    cache_hits: int = 0
    requests: int = 0  # prompts sent to the backend
    retries: int = 0
    failures: int = 0  # prompts with no answer after all retries: recorded as failed, never scored
    scored: int = 0  # defined scores or labels returned
    undefined: int = 0  # judge answered, but too little mass on the numbers or options


class Judge(ABC):
    """A logprob-reading judge. Subclasses implement `_number_probs`."""

    def __init__(
        self,
        judge_id: str,
        *,
        cache: RunStore | str | os.PathLike[str] | None = None,
        min_mass: float = MIN_MASS,
    ) -> None:
        self.judge_id = judge_id
        self.cache = RunStore(cache) if isinstance(cache, str | os.PathLike) else cache
        self.min_mass = min_mass
        self.stats = JudgeStats()

    @abstractmethod
    def _number_probs(self, prompts: list[str], hi: int) -> list[Distribution]:
        """For each prompt, the judge's probability of answering each integer 0..hi."""

    def number_probs(self, prompts: Sequence[str], hi: int = 100) -> list[Distribution]:
        """`_number_probs` through the cache; a prompt repeated within one call is asked once."""
        prompts = list(prompts)
        keys = [key(judge=self.judge_id, prompt=p, hi=hi, protocol=_PROTOCOL) for p in prompts]
        known: dict[str, Distribution] = {}
        if self.cache is not None:
            for k in dict.fromkeys(keys):
                rec = self.cache.get(CACHE_STAGE, k, tensors=False)
                if rec is not None:
                    known[k] = Distribution({int(n): p for n, p in rec.data["probs"].items()}, rec.data.get("raw"))
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in known}
        self.stats.prompts += len(prompts)
        self.stats.cache_hits += sum(k in known for k in keys)
        self.stats.requests += len(todo)
        if todo:
            fresh = dict(zip(todo, self._number_probs(list(todo.values()), hi), strict=True))
            known.update(fresh)
            self.stats.failures += sum(d.error is not None for d in fresh.values())
            if self.cache is not None:
                records = [
                    (k, {"judge": self.judge_id, "probs": {str(n): p for n, p in d.probs.items()}, "raw": d.raw}, None)
                    for k, d in fresh.items()
                    if d.error is None
                ]
                self.cache.put_many(CACHE_STAGE, records)
        return [known[k] for k in keys]

    # -- 0-100 scores --------------------------------------------------------------------------------------------

    def score(self, prompts: Sequence[str]) -> list[ScoreResult]:
        """Score complete judge prompts 0–100 (see `personaxis.judge.prompts` to build them)."""
        results = [score_from(d, self.min_mass) for d in self.number_probs(prompts, 100)]
        self._count([r.value is not None for r in results if not r.failed])
        return results

    def score_trait(self, rubric: str, question: str, answer: str) -> ScoreResult:
        """How strongly `answer` shows the trait described by `rubric`, 0–100. For many answers, batch `score`."""
        return self.score([trait_prompt(rubric, question, answer)])[0]

    def score_coherence(self, question: str, answer: str) -> ScoreResult:
        """How coherent and on-topic `answer` is, 0–100, whatever its values or stance."""
        return self.score([coherence_prompt(question, answer)])[0]

    # -- categorical ---------------------------------------------------------------------------------------------

    def classify_many(self, prompts: Sequence[str], labels: Sequence[str]) -> list[ClassifyResult]:
        """For each prompt, the most likely label; labels are shown to the judge as numbered options."""
        labels = list(labels)
        full = [classify_prompt(p, labels) for p in prompts]
        results = [classify_from(d, labels, self.min_mass) for d in self.number_probs(full, len(labels) - 1)]
        self._count([r.label is not None for r in results if not r.failed])
        return results

    def classify(self, prompt: str, labels: Sequence[str]) -> str | None:
        """The most likely label, or None if the judge put too little mass on the options (or failed)."""
        return self.classify_many([prompt], labels)[0].label

    def _count(self, defined: list[bool]) -> None:
        self.stats.scored += sum(defined)
        self.stats.undefined += len(defined) - sum(defined)
