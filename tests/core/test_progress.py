"""Progress lines: drawn in place on a terminal, with rate and time left, cleared at the
end; the command installs them only on a terminal and never with --quiet."""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner

from crowdsft import progress
from crowdsft.cli import main


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_line_is_drawn_in_place_with_rate_and_time_left_then_cleared():
    out, clock = io.StringIO(), Clock()
    bar = progress.TerminalProgress(out, interval=1.0, settle=2.0, clock=clock)
    bar("fine-tuning", 0, 40, "examples")
    assert out.getvalue() == "\r  fine-tuning: 0/40 examples"
    clock.t += 0.5
    bar("fine-tuning", 4, 40, "examples")  # within the interval: not drawn
    assert "4/40" not in out.getvalue()
    clock.t += 3.5  # 4 s in, 20 done: 5 per second, 20 left: 4 s
    bar("fine-tuning", 20, 40, "examples")
    line = "  fine-tuning: 20/40 examples, 5 examples/s, about 4 s left"
    assert out.getvalue().endswith("\r" + line)
    bar("fine-tuning", 40, 40, "examples")
    assert out.getvalue().endswith("\r" + " " * len(line) + "\r")  # the line is gone


def test_durations_read_naturally():
    assert progress.duration(42.4) == "42 s"
    assert progress.duration(185) == "3 min 5 s"
    assert progress.duration(3725) == "1 h 02 min"


@pytest.mark.parametrize(
    ("tty", "args", "installed"),
    [(False, [], False), (True, [], True), (True, ["-q"], False)],
)
def test_the_command_reports_progress_only_on_a_terminal_and_not_when_quiet(
    monkeypatch, tty, args, installed
):
    from crowdsft import cli

    monkeypatch.setattr(cli, "stderr_is_terminal", lambda: tty)
    before = progress.install(None)
    try:
        result = CliRunner().invoke(main, [*args, "plugins", "list"])
        assert result.exit_code == 0, result.output
        assert isinstance(progress._sink, progress.TerminalProgress) == installed
    finally:
        progress.install(before)


def test_only_the_main_thread_draws_and_a_line_fits_the_terminal(monkeypatch):
    import os
    import shutil
    import threading

    out = io.StringIO()
    bar = progress.TerminalProgress(out, interval=0.0, settle=0.0)
    worker = threading.Thread(target=bar, args=("background round", 1, 10, "examples"))
    worker.start()
    worker.join()
    assert out.getvalue() == ""  # a server's background rounds stay out of its log
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: os.terminal_size((40, 24)))
    bar("fine-tuning on 1200 examples x 3 epochs", 1, 10, "examples")
    assert max(len(line) for line in out.getvalue().split("\r")) <= 39
