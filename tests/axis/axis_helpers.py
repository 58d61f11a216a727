"""Shared pieces of the axis tests: a judge with scripted answers."""

from __future__ import annotations

from collections.abc import Callable

from personaxis.judge import Judge
from personaxis.judge.scoring import Distribution


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
