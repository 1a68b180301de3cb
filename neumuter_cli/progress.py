"""Progress on stderr, one rule for every stage: a tqdm bar (rate, time left) when stderr is a
terminal, the log lines when it is not (a file, a pipe, a test), nothing with ``--quiet``.

A stage takes ``progress``: any ``callable(str)`` (a plain function gets the log lines, as
before) or a :class:`Reporter`, which also knows whether to draw bars. Loops report through
:func:`steps`; one-off lines (loading, a check's result) are a call of ``progress(line)``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import IO, Callable

from .errors import escape

ProgressFn = Callable[[str], None] | None
#: lines that --quiet still shows
ALWAYS_SHOWN = ("warning:",)


class Reporter:
    """Where a command's progress goes. ``stream``: stderr (looked up at each write, so that a
    swapped sys.stderr is followed) unless given, e.g. a fake terminal in a test. ``every``:
    print at most one line per that many seconds (bars are not throttled). ``silent``: nothing
    at all, warnings included (a process of a launcher other than rank 0, which shows them)."""

    def __init__(self, quiet: bool = False, stream: IO[str] | None = None, every: float = 0.0,
                 _bars: list | None = None, silent: bool = False):
        self.quiet = quiet
        self.silent = silent
        self._stream = stream
        self._every = every
        self._last = -math.inf
        self._bars = [] if _bars is None else _bars    # open bars, shared with throttled views

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def bars(self) -> bool:
        """Whether loops draw a bar: not quiet, and the stream is a terminal."""
        if self.quiet or self.silent:
            return False
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except (OSError, ValueError):       # a closed stream
            return False

    def throttled(self, every: float) -> "Reporter":
        """The same reporter, printing at most one line per ``every`` seconds (inner loops)."""
        return Reporter(self.quiet, self._stream, every, self._bars, self.silent)

    def __call__(self, message: str) -> None:
        if self.silent or (self.quiet and not message.startswith(ALWAYS_SHOWN)):
            return
        # no control character reaches the terminal raw; a line break of the message itself
        # (a table) stays, so the user data in a line is escaped where it is put in
        message = escape(message, keep_newlines=True)
        if self._every:
            now = time.monotonic()
            if now - self._last < self._every:
                return
            self._last = now
        if self._bars:
            self._bars[-1].write(message)   # above the bar, which is drawn again below it
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """End any bar a loop left open (it stopped on an error), so that what follows on
        stderr starts on a line of its own."""
        while self._bars:
            self._bars.pop().close(None)


class _Bar:
    def __init__(self, reporter: Reporter, total: int | None, desc: str, unit: str):
        from tqdm import tqdm

        self.reporter = reporter
        self.tqdm = tqdm(total=total, desc=desc, unit=unit, file=reporter.stream, dynamic_ncols=True,
                         leave=not reporter._bars, mininterval=0.5)

    def write(self, message: str) -> None:
        self.tqdm.write(message, file=self.reporter.stream)

    def advance(self, n: int, note: str | None) -> None:
        if note:
            self.tqdm.set_postfix_str(note, refresh=False)
        self.tqdm.update(n)

    def close(self, done: int | None) -> None:
        if done is not None and self.tqdm.total is not None and done != self.tqdm.total:
            self.tqdm.total = done          # an early stop: the bar ends full at what was done
            self.tqdm.refresh()
        self.tqdm.close()


class Steps:
    """What :func:`steps` returns. ``advance(n, line, note)``: on a terminal, move the bar by
    ``n`` units and show ``note`` beside it (what the bar itself does not say: a loss); otherwise
    print ``line``, the stage's log line, if any. ``done(count)``: the loop stopped early, after
    ``count`` units (the bar then ends there, not short of its total). ``close()`` ends the bar;
    a ``with`` block closes it too, and :meth:`Reporter.close` closes any left open (an error)."""

    def __init__(self, progress: ProgressFn, bar: _Bar | None):
        self._progress, self._bar, self._done = progress, bar, None
        self.count = 0                      # units advanced so far

    @property
    def bar(self) -> bool:
        return self._bar is not None

    def advance(self, n: int = 1, line: str | None = None, note: str | None = None) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.advance(n, note)
        elif line and self._progress:
            self._progress(line)

    def done(self, count: int) -> None:
        self._done = count

    def close(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            if bar in bar.reporter._bars:
                bar.reporter._bars.remove(bar)
            bar.close(self._done)

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def steps(progress: ProgressFn, total: int | None, desc: str, unit: str = "it") -> Steps:
    """Report a loop of ``total`` units (None: unknown) through ``progress``: a bar when it is a
    :class:`Reporter` on a terminal, its log lines otherwise (see :class:`Steps`)."""
    if not (isinstance(progress, Reporter) and progress.bars):
        return Steps(progress, None)
    bar = _Bar(progress, total, desc, unit)
    progress._bars.append(bar)
    return Steps(progress, bar)


def follow_in_transformers(reporter: Reporter) -> None:
    """transformers draws bars of its own (loading weights) even when stderr is not a
    terminal: let them follow the reporter's rule, so that --quiet and a log file stay clean."""
    from transformers.utils import logging

    if reporter.bars:
        logging.enable_progress_bar()
    else:
        logging.disable_progress_bar()


def throttled(progress: ProgressFn, every: float = 2.0) -> ProgressFn:
    """``progress`` printing at most one line per ``every`` seconds (for the inner loops); a
    Reporter keeps its bars."""
    if progress is None:
        return None
    if isinstance(progress, Reporter):
        return progress.throttled(every)
    last = [-math.inf]

    def say(message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            progress(message)
    return say


__all__ = ["ProgressFn", "Reporter", "Steps", "steps", "throttled", "follow_in_transformers", "ALWAYS_SHOWN"]
