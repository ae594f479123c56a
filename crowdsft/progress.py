"""Progress of long steps (fine-tuning, answering prompts), reported where a person watches.

Library code calls ``report(task, done, total, unit)`` as it goes; by default nothing listens.
The ``crowdsft`` command installs a ``TerminalProgress`` when stderr is a terminal and
``--quiet`` is not given: one line, rewritten in place, with the rate and the time left, and
cleared when the step ends (or fails). Only the main thread draws: a server's background
rounds do not write into its log. Log lines and the commands' own output are unaffected, so
redirected output holds no progress lines at all.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

Sink = Callable[[str, int, int, str], None]

_sink: Sink | None = None


def report(task: str, done: int, total: int, unit: str = "steps") -> None:
    """``done`` of ``total`` ``unit`` of ``task`` are done (``done == total``: finished)."""
    if _sink is not None:
        _sink(task, done, total, unit)


def install(sink: Sink | None) -> Sink | None:
    """Make ``sink`` receive every report (None: nobody); returns the one it replaces."""
    global _sink
    before, _sink = _sink, sink
    return before


def clear() -> None:
    """Take any progress line off the screen (before an error message, say)."""
    end = getattr(_sink, "clear", None)
    if end is not None:
        end()


@contextmanager
def reporting_to(sink: Sink | None) -> Iterator[None]:
    before = install(sink)
    try:
        yield
    finally:
        install(before)


def duration(seconds: float) -> str:
    """ "42 s", "3 min 5 s", "1 h 02 min"."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class TerminalProgress:
    """One line on ``stream`` per running task, redrawn at most every ``interval`` seconds:
    ``  training a candidate: 12/36 steps, 1.9 steps/s, about 13 s left``. The rate and time
    left appear once the task has run ``settle`` seconds (the first steps include warm-up)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        interval: float = 0.5,
        settle: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.settle = settle
        self.clock = clock
        self._task: str | None = None
        self._started = 0.0
        self._first_done = 0
        self._drawn = 0.0
        self._width = 0

    def line(self, task: str, done: int, total: int, unit: str) -> str:
        text = f"  {task}: {done}/{total} {unit}"
        elapsed = self.clock() - self._started
        if elapsed >= self.settle and done > self._first_done:
            rate = (done - self._first_done) / elapsed
            text += f", {rate:.3g} {unit}/s, about {duration((total - done) / rate)} left"
        return text

    def __call__(self, task: str, done: int, total: int, unit: str = "steps") -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # a server's background rounds: their lines would cut into its log
        now = self.clock()
        if task != self._task:
            self._task, self._started, self._first_done, self._drawn = task, now, done, 0.0
        if done >= total:
            self.clear()
            return
        if now - self._drawn < self.interval:
            return
        self._drawn = now
        width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be redrawn
        text = self.line(task, done, total, unit)[: max(width, 20)]
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def clear(self) -> None:
        self._task = None
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
