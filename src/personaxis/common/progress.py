"""The one progress bar that every long stage shows: what, how far, how long left; and `working`, the one line for a
step that has no count (loading a model, starting a server).

On a terminal both are drawn by rich and vanish or stay as asked. Anywhere else (a pipe, a log file, nohup, a
scheduler) rich would draw nothing until the end, so both write plain lines instead: one once a step has run
`FIRST_LINE` seconds, then one at least every `LOG_EVERY` seconds (with done/total and the time left where there is a
count), and one when it ends. Both write to stderr unless given a console: stdout stays the command's output.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from personaxis.errors import PersonaxisError

T = TypeVar("T")

LOG_EVERY = 30.0
"""Seconds between progress lines when the output is a log file rather than a terminal; $PERSONAXIS_LOG_EVERY
overrides it (0: a line at every update)."""
FIRST_LINE = 2.0
"""Seconds a step runs before its first line in a log file: shorter steps say nothing there."""

_stderr: Console | None = None


def stderr_console() -> Console:
    """The console progress and status lines go to: stderr, shared so that bars inside bars nest."""
    global _stderr
    if _stderr is None:
        _stderr = Console(stderr=True)
    return _stderr


def log_every() -> float:
    """$PERSONAXIS_LOG_EVERY if set, else `LOG_EVERY`."""
    value = os.environ.get("PERSONAXIS_LOG_EVERY", "").strip()
    if not value:
        return LOG_EVERY
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise PersonaxisError(f"PERSONAXIS_LOG_EVERY={value!r}: expected seconds between progress lines, e.g. 30")
    return seconds


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class _Bar(Progress):
    """rich draws nothing into a file until the bar stops, so a job run under nohup or a scheduler would say nothing
    for hours; there, each task writes a line once it has run `first` seconds, then every `every` seconds (from a
    thread of its own, so a slow batch is reported while it runs), and one when it finishes. A transient task
    (an inner step whose caller reports on it) writes that last line only if it wrote one before: a short inner
    step stays silent."""

    def __init__(self, *columns: Any, every: float, first: float, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._every = every
        self._first = min(first, every)
        self._quiet_end = self.live.transient
        self._said: dict[TaskID, float] = {}  # when each task last wrote a line
        self._ended: set[TaskID] = set()
        self._lines = threading.RLock()  # the ticking thread and the caller's updates write one line at a time
        self._log = not (self.disable or self.console.is_terminal)
        self._stop_ticking = threading.Event()
        self._ticker: threading.Thread | None = None

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def start(self) -> None:
        if not self._log:
            return super().start()
        # no live display at all: rich would only add blank lines to the file; a thread of ours writes the lines
        # that fall due while a slow batch runs
        self._stop_ticking.clear()
        self._ticker = threading.Thread(target=self._tick, name="personaxis-progress", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        if not self._log:
            return super().stop()
        self._stop_ticking.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None

    def _tick(self) -> None:
        while not self._stop_ticking.wait(min(0.5, max(self._first, 0.05))):
            for task_id in list(self._tasks):
                self._say(task_id)

    def _say(self, task_id: TaskID) -> None:
        if not self._log:
            return
        with self._lines:
            task = self._tasks.get(task_id)
            if task is None or task_id in self._ended:
                return
            now = self.get_time()  # the clock rich times the task with
            started = now if task.start_time is None else task.start_time
            last = self._said.get(task_id)
            if task.finished:
                self._ended.add(task_id)
                if self._quiet_end and last is None:
                    return
            elif (now - started < self._first) if last is None else (now - last < self._every):
                return
            self._said[task_id] = now
            line = f"{task.description}: {task.completed:g}"
            if task.total:
                line += f"/{task.total:g} ({100 * task.completed / task.total:.0f}%)"
            elapsed = task.finished_time if task.finished and task.finished_time is not None else now - started
            line += f", {_clock(elapsed)} elapsed"
            if not task.finished and task.total and task.completed > 0:
                # the mean rate since the start: rich's own estimate needs several updates within 30 s, and a log
                # line comes half a minute or more apart
                line += f", about {_clock(elapsed * (task.total - task.completed) / task.completed)} left"
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def progress_bar(
    enabled: bool = True,
    *,
    transient: bool = False,
    console: Console | None = None,
    every: float | None = None,
    first: float = FIRST_LINE,
) -> Progress:
    """A bar per task, labelled by the task's description (`bar.add_task(description, total=n)`), on stderr unless
    `console` says otherwise.

    `every`: seconds between lines in a log file (default: `log_every()`). `transient` bars vanish when done: for
    inner steps (generating, capturing, training) whose caller reports on them; in log files they write lines only
    when they last longer than `first` seconds.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return _Bar(
        *columns, every=log_every() if every is None else every, first=first, disable=not enabled, transient=transient,
        console=console or stderr_console(),
    )  # fmt: skip


@contextmanager
def working(
    message: str, *, console: Console | None = None, every: float | None = None, first: float = FIRST_LINE
) -> Iterator[None]:
    """One step without a count, e.g. ``with working("loading default"): ...``: a spinner on a terminal; elsewhere,
    once the step has run `first` seconds (at once with $PERSONAXIS_LOG_EVERY=0), the message as a plain line, then
    ``still <message>`` lines every `every` seconds, and the time it took. A step that fails or ends sooner says
    nothing there: a mistake stays a one-line error.

    Put slow imports inside the block: they are part of the wait."""
    console = console or stderr_console()
    every = log_every() if every is None else every
    if console.is_terminal:
        with console.status(f"{message}..."):
            yield
        return
    start = time.monotonic()
    done = threading.Event()
    said = threading.Event()
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            if not done.is_set():
                console.print(line, markup=False, highlight=False, soft_wrap=True)
                said.set()

    def remind() -> None:
        if done.wait(min(first, every)):
            return
        say(f"{message}...")
        while not done.wait(max(every, 0.1)):
            say(f"still {message}, {_clock(time.monotonic() - start)} elapsed")

    reminder = threading.Thread(target=remind, name="personaxis-working", daemon=True)
    reminder.start()
    try:
        yield
    finally:
        with lock:
            done.set()
        reminder.join()
    if said.is_set():
        console.print(
            f"{message}: done in {_clock(time.monotonic() - start)}", markup=False, highlight=False, soft_wrap=True
        )


def in_chunks(items: Sequence[T], size: int, description: str, progress: bool = True) -> Iterator[Sequence[T]]:
    """`items` `size` at a time, under a bar that advances as each chunk is done: for work (judging, mostly) that
    is asked in batches so that a long list shows how far it has got."""
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(items))
        for start in range(0, len(items), size):
            part = items[start : start + size]
            yield part
            bar.advance(task, len(part))
