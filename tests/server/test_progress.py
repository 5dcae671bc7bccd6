"""Console lines reach a log file whole: a phrase a reader greps for is never wrapped across lines."""

from __future__ import annotations

import io

from fedpeft.server.progress import ConsoleProgress, plain_console


def test_a_long_line_is_not_wrapped_when_the_output_is_not_a_terminal(monkeypatch):
    long_dir = "/tmp/" + "x" * 150 + "/runs/a"
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stdout", buffer)
    ConsoleProgress(3, plain_console()).message(f"resuming {long_dir} after round 1 (its checkpoint)")
    assert f"resuming {long_dir} after round 1" in buffer.getvalue()
