"""Judging replies for a trait: the trait rubric and the coherence rubric, batched, with a progress bar.

Scores are never made up: a judgement the judge could not give (the endpoint failed after its retries) or gave
without enough mass on numbers (a refusal, prose) stays None, and `JudgeCounts` says how many of each there were, so
every downstream number can report what it rests on. The judge's own cache (in the run store) makes a rerun free, and
failed calls are not cached, so a rerun asks again exactly those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from personaxis.common.progress import in_chunks
from personaxis.judge import Judge, ScoreResult, coherence_prompt, trait_prompt


@dataclass(frozen=True)
class Judged:
    """A reply's two judgements."""

    trait: ScoreResult
    coherence: ScoreResult

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"trait": self.trait.value, "coherence": self.coherence.value}
        for name, result in (("trait", self.trait), ("coherence", self.coherence)):
            if result.failed:
                out[f"{name}_error"] = result.error
            elif result.value is None:
                out[f"{name}_undefined"] = round(result.numeric_mass, 4)
        return out


@dataclass
class JudgeCounts:
    """How the judgements of one stage went."""

    asked: int = 0
    failed: int = 0  # no answer from the judge after its retries
    undefined: int = 0  # answered, but too little probability on the numbers
    last_error: str | None = None

    def add(self, result: ScoreResult) -> None:
        self.asked += 1
        if result.failed:
            self.failed += 1
            self.last_error = result.error
        elif result.value is None:
            self.undefined += 1

    def as_dict(self) -> dict[str, object]:
        return {"asked": self.asked, "failed": self.failed, "undefined": self.undefined, "last_error": self.last_error}


def judge_replies(
    judge: Judge,
    rubric: str,
    items: Sequence[tuple[str, str]],
    *,
    coherence: bool = True,
    chunk: int = 16,
    progress: bool = True,
    description: str = "judging",
) -> tuple[list[Judged], JudgeCounts]:
    """Score each (question, answer) for the trait and, unless `coherence=False`, for coherence."""
    missing = ScoreResult(None, 0.0, error="not asked")
    out: list[Judged] = []
    counts = JudgeCounts()
    for part in in_chunks(items, chunk, description, progress):
        prompts = [trait_prompt(rubric, q, a) for q, a in part]
        if coherence:
            prompts += [coherence_prompt(q, a) for q, a in part]
        results = judge.score(prompts)
        traits = results[: len(part)]
        coherences = results[len(part) :] if coherence else [missing] * len(part)
        for t, c in zip(traits, coherences, strict=True):
            counts.add(t)
            if coherence:
                counts.add(c)
            out.append(Judged(t, c))
    return out, counts
