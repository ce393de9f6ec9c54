"""Progress: a bar on a terminal, dated lines everywhere else, never past 100%."""

from __future__ import annotations

import io

from pipeline.cli.progress import LINE_EVERY_S, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_line_per_tenth_and_every_few_minutes() -> None:
    clock, lines = Clock(), []
    progress = Progress(100.0, True, lines.append, stream=io.StringIO(), clock=clock)
    for _ in range(20):  # 5 Mpx every 10 s: a tenth every 20 s
        clock.now += 10
        progress.update(5.0)
    assert len(lines) == 10
    assert lines[0] == "progress  10% 10.0/100.0 Mpx, 0.50 Mpx/s, 0:20 elapsed, 3:00 left"
    assert lines[-1].startswith("progress 100% 100.0/100.0 Mpx")
    slow, said = Progress(100.0, True, (lambda line: said.append(line)), stream=io.StringIO(), clock=clock), []
    for _ in range(3):  # a slow run: a line every LINE_EVERY_S even without a tenth done
        clock.now += LINE_EVERY_S
        slow.update(1.0)
    assert len(said) == 3 and said[-1].startswith("progress   3% 3.0/100.0 Mpx")


def test_counts_past_the_total_are_clamped_and_nothing_shows_when_disabled() -> None:
    clock, lines = Clock(), []
    progress = Progress(10.0, True, lines.append, stream=io.StringIO(), clock=clock)
    clock.now = 5
    progress.update(7.5)
    progress.update(7.5)  # more than was planned (rounding): still 100%, never more, once
    progress.update(1.0)
    assert progress.done == 10.0 and len(lines) == 2
    assert (
        lines[0].startswith("progress  75%")
        and lines[1].startswith("progress 100% 10.0/10.0")
        and "0:00 left" in lines[1]
    )
    quiet: list[str] = []
    off = Progress(10.0, False, quiet.append, stream=io.StringIO(), clock=clock)
    off.update(5.0)
    assert quiet == []


def test_on_a_terminal_the_bar_never_passes_its_total() -> None:
    stream, lines = Terminal(), []
    with Progress(1.0, True, lines.append, stream=stream) as progress:
        progress.add_total(1.0)
        for _ in range(5):
            progress.update(0.75)
        assert progress.bar.n == 2.0 and progress.bar.total == 2.0
    assert lines == []  # the bar, not lines
    shown = stream.getvalue()
    assert "2.0/2.0 Mpx" in shown and "<-" not in shown and "100%" in shown
