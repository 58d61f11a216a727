"""The one progress bar that every long stage shows: what, how far, how long left."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress


def progress_bar(enabled: bool = True, *, transient: bool = False) -> Progress:
    """A bar per task, labelled by the task's description (`bar.add_task(description, total=n)`).

    `transient` bars vanish when done: for inner steps (generating, capturing, training) whose caller reports on them.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=not enabled, transient=transient)
