"""Judges that read scores from logprobs: 0–100 rubric scores and categorical labels, remote or local, cached.

Score rule (science.md §1 step 3): ``Σ k·p(k) / Σ p(k)`` over the judge's probability of answering each integer
0–100; undefined (None, counted in `Judge.stats`) when that mass is below 0.25.
"""

from personaxis.judge.api import OpenAIJudge
from personaxis.judge.base import Judge, JudgeStats
from personaxis.judge.local import LocalJudge
from personaxis.judge.prompts import (
    COHERENCE_RUBRIC,
    JAILBREAK_HARMFUL,
    JAILBREAK_LABELS,
    ROLE_ADOPTION_LABELS,
    classify_prompt,
    coherence_prompt,
    trait_prompt,
)
from personaxis.judge.scoring import (
    MIN_MASS,
    ClassifyResult,
    Distribution,
    ScoreResult,
    classify_from,
    parse_integer,
    score_from,
)

__all__ = [
    "COHERENCE_RUBRIC",
    "JAILBREAK_HARMFUL",
    "JAILBREAK_LABELS",
    "MIN_MASS",
    "ROLE_ADOPTION_LABELS",
    "ClassifyResult",
    "Distribution",
    "Judge",
    "JudgeStats",
    "LocalJudge",
    "OpenAIJudge",
    "ScoreResult",
    "classify_from",
    "classify_prompt",
    "coherence_prompt",
    "parse_integer",
    "score_from",
    "trait_prompt",
]
