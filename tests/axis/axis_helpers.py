"""Shared pieces of the axis tests: a judge with scripted answers and a CLI runner with the axis commands."""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer

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


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the main entry point with the axis commands registered as the lead registers them."""
    import personaxis.cli as cli
    from personaxis.axis.cli import axis_app, cap_app, register

    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
    app.add_typer(axis_app, name="axis")
    app.add_typer(cap_app, name="cap")
    register(app)
    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(sys, "argv", ["personaxis", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
