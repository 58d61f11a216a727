"""The one progress bar that every long stage shows: what, how far, how long left."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")

LOG_EVERY = 60.0
"""Seconds between progress lines when the output is a log file rather than a terminal."""


class _Bar(Progress):
    """rich draws nothing into a file until the bar stops, so a job run under nohup or a scheduler would say nothing
    for hours; there, each lasting task writes one line every `every` seconds and one when it finishes."""

    def __init__(self, *columns: Any, every: float, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._every = every
        self._said: dict[TaskID, float] = {}  # when each task last wrote a line
        self._ended: set[TaskID] = set()
        self._log = not (self.disable or self.live.transient or self.console.is_terminal)
        if self._log:
            self.live.transient = True  # the lines say it all; no bar drawn once more at the end

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def _say(self, task_id: TaskID) -> None:
        if not self._log or task_id in self._ended:
            return
        task = self._tasks[task_id]
        now = self.get_time()  # the clock rich times the task with
        started = now if task.start_time is None else task.start_time
        if not task.finished and now - self._said.setdefault(task_id, started) < self._every:
            return
        self._said[task_id] = now
        if task.finished:
            self._ended.add(task_id)
        line = f"{task.description}: {task.completed:g}"
        if task.total:
            line += f"/{task.total:g} ({100 * task.completed / task.total:.0f}%)"
        elapsed = task.elapsed or 0
        line += f", {timedelta(seconds=round(elapsed))} elapsed"
        if not task.finished and task.total and task.completed > 0:
            # the mean rate since the start: rich's own estimate needs several updates within 30 s, and a log line
            # comes a minute or more apart
            left = elapsed * (task.total - task.completed) / task.completed
            line += f", about {timedelta(seconds=round(left))} left"
        self.console.print(line, markup=False, highlight=False)


def progress_bar(
    enabled: bool = True, *, transient: bool = False, console: Console | None = None, every: float = LOG_EVERY
) -> Progress:
    """A bar per task, labelled by the task's description (`bar.add_task(description, total=n)`).

    `transient` bars vanish when done: for inner steps (generating, capturing, training) whose caller reports on them;
    they also stay silent in log files.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return _Bar(*columns, every=every, disable=not enabled, transient=transient, console=console)


def in_chunks(items: Sequence[T], size: int, description: str, progress: bool = True) -> Iterator[Sequence[T]]:
    """`items` `size` at a time, under a bar that advances as each chunk is done: for work (judging, mostly) that
    is asked in batches so that a long list shows how far it has got."""
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(items))
        for start in range(0, len(items), size):
            part = items[start : start + size]
            yield part
            bar.advance(task, len(part))
