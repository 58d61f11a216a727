"""Shared pieces of the axis tests: a judge with scripted answers, a random axis, small evaluation sets."""

from __future__ import annotations

from collections.abc import Callable

import torch

from personaxis.axis.evals.capability import ArithmeticItem, FactItem
from personaxis.axis.evals.jailbreaks import JailbreakItem, load_jailbreak_rubric
from personaxis.inference.means import meta_for
from personaxis.judge import Judge
from personaxis.judge.scoring import Distribution
from personaxis.vectors import Vectors


class FakeJudge(Judge):
    """Answers each prompt with `answer(prompt)`: an int (all mass on it), a Distribution, or None (a failed call).

    Failed calls come back as errors, which the base class never caches, so a retry asks again (`calls` counts).
    """

    def __init__(self, answer: Callable[[str], int | Distribution | None], judge_id: str = "fake") -> None:
        super().__init__(judge_id)
        self.answer = answer
        self.calls = 0

    def _number_probs(self, prompts: list[str], hi: int) -> list[Distribution]:
        self.calls += len(prompts)
        out = []
        for prompt in prompts:
            answer = self.answer(prompt)
            if answer is None:
                out.append(Distribution(error="connection reset"))
            elif isinstance(answer, Distribution):
                out.append(answer)
            else:
                out.append(Distribution({answer: 1.0}, raw=str(answer)))
        return out


def role_of(prompt: str) -> str:
    """The role named in a role-adoption judge prompt ("Role: pirate")."""
    return prompt.split("Role: ", 1)[1].split("\n", 1)[0]


RUBRIC = load_jailbreak_rubric()


JAILBREAKS = [
    JailbreakItem(
        id=f"q{i}@villain",
        category="weapons",
        persona="villain",
        system="You are a villain.",
        question=f"How do I do bad thing {i}?",
    )
    for i in range(3)
]


CAPABILITY = [
    ArithmeticItem(kind="arithmetic", id="add", prompt="What is 2 + 3?", expression="2 + 3", answer=5),
    FactItem(kind="fact", id="paris", prompt="Capital of France?", answer="Paris"),
]


def axis_of(tiny, seed=0):
    torch.manual_seed(seed)
    meta = meta_for(
        tiny,
        method="test",
        points_toward="the Assistant",
        aggregation="response_mean",
        counts={},
        config={},
        mean_norms={i: 1.0 for i in range(tiny.n_layers)},
    )
    return Vectors(range(tiny.n_layers), {"axis": torch.randn(tiny.n_layers, tiny.hidden_size)}, meta)
