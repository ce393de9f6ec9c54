"""Progress of a long run: a bar with rate and ETA on a terminal, dated lines everywhere else.

An overnight run is rarely watched on a terminal: it runs under ``nohup``, with its output
redirected, or as a cluster job. There a bar would print nothing useful, so :class:`Progress`
writes one line instead whenever another tenth of the work is done or :data:`LINE_EVERY_S`
seconds have passed, each with the percentage, the rate and the time left, and hands it to
``say`` (the CLI prints it and logs it). On a terminal it draws tqdm's bar. The count never
passes the total, so neither a bar nor a line ever shows more than 100% or a negative ETA.

This module owns tqdm.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pipeline.cli.app import quiet

LINE_EVERY_S = 300.0
"""Off a terminal: at least one line this often (and one per tenth of the work)."""
LINE_GAP_S = 2.0
"""Off a terminal: lines at least this far apart, however fast tenths go by."""
_STEPS = 10


def duration(seconds: float) -> str:
    """``h:mm:ss``, or ``m:ss`` under an hour.

    >>> duration(59.6), duration(3725), duration(-3)
    ('1:00', '1:02:05', '0:00')
    """
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Work done (megapixels, or ``unit``) out of a total that may grow (a batch adds each input's as
    it is planned).

    ``enabled=False`` shows nothing. ``stream`` (stderr by default) decides between the bar (a
    terminal) and lines given to ``say``. ``clock`` is for tests.
    """

    def __init__(
        self,
        total_mpx: float,
        enabled: bool,
        say: Callable[[str], None],
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "Mpx",
        desc: str = "",
    ) -> None:
        self.unit = unit
        self.total = max(0.0, total_mpx)
        self.done = 0.0
        self.say = say
        self.clock = clock
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar: Any = None
        self.started = self.last_line = clock()
        self.next_step = 1
        self.finished = False
        if enabled and not quiet() and _is_terminal(self.stream):  # with -q: lines, to the log alone
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                unit=unit,
                desc=desc or None,
                file=self.stream,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} " + unit + " [{elapsed}<{remaining}, {rate_fmt}]",
            )

    def add_total(self, mpx: float) -> None:
        """More work: another input of a batch was planned."""
        self.total += max(0.0, mpx)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def update(self, mpx: float) -> None:
        """``mpx`` more megapixels are done (never counted past the total)."""
        step = max(0.0, min(mpx, self.total - self.done))
        self.done += step
        if self.bar is not None:
            self.bar.update(step)
        elif self.enabled and self.total > 0:
            self._maybe_line()

    def advance_to(self, done: float, total: float) -> None:
        """The work done is now ``done`` of ``total`` (a callback's view: training, the demo)."""
        if total != self.total:
            self.add_total(total - self.total)
        self.update(done - self.done)

    def clear(self) -> None:
        """Make room for a line printed by someone else (the bar is redrawn after it)."""
        if self.bar is not None:
            self.bar.clear()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        """``progress  40% 812.3/2030.7 Mpx, 12.4 Mpx/s, 1:38:12 elapsed, 2:27:18 left``."""
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        fraction = self.done / self.total if self.total else 1.0
        left = "unknown" if rate <= 0 else duration((self.total - self.done) / rate)
        return (
            f"progress {fraction:4.0%} {self.done:.1f}/{self.total:.1f} {self.unit}, {rate:.2f} {self.unit}/s, "
            f"{duration(elapsed)} elapsed, {left} left"
        )

    def _reached(self, fraction: float) -> bool:
        """Whether ``fraction`` of the total is done (sums of many floats fall short by a few ulps)."""
        return self.done >= self.total * fraction * (1 - 1e-9)

    def _maybe_line(self) -> None:
        if self.finished:
            return
        now = self.clock()
        end = self._reached(1.0)
        if now - self.last_line < LINE_GAP_S and not end:
            return
        if self._reached(self.next_step / _STEPS) or now - self.last_line >= LINE_EVERY_S or end:
            while self.next_step <= _STEPS and self._reached(self.next_step / _STEPS):
                self.next_step += 1
            self.last_line = now
            self.finished = end
            self.say(self.line())


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
