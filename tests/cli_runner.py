"""Run the `personaxis` command line in-process, as a user's shell would, for tests."""

from __future__ import annotations

import sys


def invoke(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`personaxis ARGS...` through the real entry point; returns (exit code, stdout, stderr)."""
    from personaxis.cli.main import main

    monkeypatch.setattr(sys, "argv", ["personaxis", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
