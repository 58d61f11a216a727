"""Progress in a log file: rich alone would stay silent until the bar stops."""

import io
import time

import pytest
from rich.console import Console

from personaxis.common.progress import in_chunks, progress_bar, working


def _log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def _lines(out: io.StringIO, description: str) -> list[str]:
    return [line for line in out.getvalue().splitlines() if line.startswith(f"{description}:")]


def test_log_lines_while_running_and_once_at_the_end():
    console, out = _log_console()
    with _untimed(progress_bar(console=console, every=0)) as bar:
        task = bar.add_task("rollouts", total=4)
        for _ in range(4):
            bar.advance(task, 1)
        bar.advance(task, 0)  # finished tasks say nothing more
    lines = _lines(out, "rollouts")
    assert [line.split(",")[0] for line in lines] == [
        "rollouts: 1/4 (25%)",
        "rollouts: 2/4 (50%)",
        "rollouts: 3/4 (75%)",
        "rollouts: 4/4 (100%)",
    ]
    assert "left" not in lines[-1]
    assert "━" not in out.getvalue()  # the lines replace the bar, which is not drawn once more at the end


def test_a_long_interval_leaves_only_the_final_line():
    console, out = _log_console()
    with progress_bar(console=console, every=3600) as bar:
        task = bar.add_task("judging", total=3)
        for _ in range(3):
            bar.update(task, advance=1)
    assert [line.split(",")[0] for line in _lines(out, "judging")] == ["judging: 3/3 (100%)"]


def test_disabled_bars_and_terminals_write_no_lines():
    log, terminal = Console(file=io.StringIO(), width=200), Console(file=io.StringIO(), force_terminal=True, width=200)
    for console, kwargs in ((log, {"enabled": False}), (terminal, {})):
        with progress_bar(console=console, every=0, **kwargs) as bar:
            task = bar.add_task("generating", total=2)
            bar.advance(task, 2)
        assert "elapsed" not in console.file.getvalue(), kwargs


def _fake_clock(bar) -> list[float]:
    clock = [0.0]
    bar.get_time = lambda: clock[0]
    _untimed(bar)
    return clock


def _untimed(bar):
    """Lines from the bar's updates only: no thread writing them on its own between a test's steps."""
    bar._tick = lambda: None
    return bar


def test_a_short_transient_step_stays_silent_and_a_long_one_reports():
    console, out = _log_console()
    bar = progress_bar(console=console, transient=True, every=30, first=2)
    clock = _fake_clock(bar)
    with bar:
        quick = bar.add_task("capturing", total=2)
        clock[0] = 1.0
        bar.advance(quick, 2)
    assert out.getvalue() == ""

    bar = progress_bar(console=console, transient=True, every=30, first=2)
    clock = _fake_clock(bar)
    with bar:
        slow = bar.add_task("generating", total=4)
        for t in (3.0, 20.0, 40.0, 70.0):
            clock[0] = t
            bar.advance(slow, 1)
    assert _lines(out, "generating") == [
        "generating: 1/4 (25%), 0:00:03 elapsed, about 0:00:09 left",  # the first line after 2 s
        "generating: 3/4 (75%), 0:00:40 elapsed, about 0:00:13 left",  # then every 30 s
        "generating: 4/4 (100%), 0:01:10 elapsed",  # and the end, since it said something before
    ]


def test_a_slow_batch_is_reported_while_it_runs():
    """Lines come from a thread too: a step stuck in its first batch still says it is alive."""
    console, out = _log_console()
    with progress_bar(console=console, transient=True, every=0.2, first=0.1) as bar:
        task = bar.add_task("generating", total=8)
        deadline = time.monotonic() + 10
        while len(_lines(out, "generating")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # no advance: only the refresh thread can write
        bar.advance(task, 8)
    lines = _lines(out, "generating")
    assert len(lines) >= 3 and lines[0].startswith("generating: 0/8 (0%), "), lines
    assert lines[-1].startswith("generating: 8/8 (100%)")


def test_working_says_the_step_in_a_log_and_spins_on_a_terminal():
    console, out = _log_console()
    with working("loading default", console=console, every=0.1, first=0.05):
        time.sleep(0.35)
    lines = out.getvalue().splitlines()
    assert lines[0] == "loading default..."
    assert any(line.startswith("still loading default, 0:00:00 elapsed") for line in lines[1:-1]), lines
    assert lines[-1] == "loading default: done in 0:00:00"
    terminal = Console(file=io.StringIO(), force_terminal=True, width=200)
    with working("loading default", console=terminal):
        pass
    assert "still" not in terminal.file.getvalue()


def test_a_quick_or_failing_step_says_nothing_in_a_log():
    """So that a mistake found at once is still a one-line error."""
    console, out = _log_console()
    with working("loading default", console=console, every=30):
        pass
    with pytest.raises(ValueError), working("loading missing", console=console, every=30):
        raise ValueError("no model")
    assert out.getvalue() == ""


def test_a_task_without_a_total_says_its_count():
    console, out = _log_console()
    with _untimed(progress_bar(console=console, every=0)) as bar:
        task = bar.add_task("judging", total=None)
        bar.advance(task, 5)
    assert [line.split(",")[0] for line in _lines(out, "judging")] == ["judging: 5"]


def test_time_left_comes_from_the_mean_rate_even_when_updates_are_minutes_apart():
    console, out = _log_console()
    bar = progress_bar(console=console, every=60)
    clock = _fake_clock(bar)
    with bar:
        task = bar.add_task("rollouts", total=10)
        for minute, done in ((1, 2), (3, 2)):
            clock[0] = 60.0 * minute
            bar.advance(task, done)
    lines = _lines(out, "rollouts")
    assert lines[0] == "rollouts: 2/10 (20%), 0:01:00 elapsed, about 0:04:00 left"
    assert lines[1] == "rollouts: 4/10 (40%), 0:03:00 elapsed, about 0:04:30 left"


def test_chunks_cover_the_items_in_order():
    items = list(range(10))
    assert [list(c) for c in in_chunks(items, 4, "judging", progress=False)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(in_chunks([], 4, "judging", progress=False)) == []


def test_the_interval_comes_from_the_environment(monkeypatch):
    from personaxis.common.progress import LOG_EVERY, log_every
    from personaxis.errors import PersonaxisError

    monkeypatch.delenv("PERSONAXIS_LOG_EVERY", raising=False)
    assert log_every() == LOG_EVERY == 30
    monkeypatch.setenv("PERSONAXIS_LOG_EVERY", "5")
    assert log_every() == 5 and progress_bar()._every == 5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("PERSONAXIS_LOG_EVERY", bad)
        with pytest.raises(PersonaxisError, match="PERSONAXIS_LOG_EVERY"):
            log_every()
