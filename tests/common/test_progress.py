"""Progress in a log file: rich alone would stay silent until the bar stops."""

import io

from rich.console import Console

from personaxis.common.progress import in_chunks, progress_bar


def _log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def _lines(out: io.StringIO, description: str) -> list[str]:
    return [line for line in out.getvalue().splitlines() if line.startswith(f"{description}:")]


def test_log_lines_while_running_and_once_at_the_end():
    console, out = _log_console()
    with progress_bar(console=console, every=0) as bar:
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


def test_transient_and_disabled_bars_and_terminals_write_no_lines():
    log, terminal = Console(file=io.StringIO(), width=200), Console(file=io.StringIO(), force_terminal=True, width=200)
    for console, kwargs in ((log, {"transient": True}), (log, {"enabled": False}), (terminal, {})):
        with progress_bar(console=console, every=0, **kwargs) as bar:
            task = bar.add_task("generating", total=2)
            bar.advance(task, 2)
        assert "elapsed" not in console.file.getvalue(), kwargs


def test_a_task_without_a_total_says_its_count():
    console, out = _log_console()
    with progress_bar(console=console, every=0) as bar:
        task = bar.add_task("judging", total=None)
        bar.advance(task, 5)
    assert [line.split(",")[0] for line in _lines(out, "judging")] == ["judging: 5"]


def test_time_left_comes_from_the_mean_rate_even_when_updates_are_minutes_apart():
    console, out = _log_console()
    clock = [0.0]
    bar = progress_bar(console=console, every=60)
    bar.get_time = lambda: clock[0]
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
