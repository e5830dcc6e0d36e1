"""Progress off a terminal: a line every N seconds or every fraction of the total, whichever comes first,
with the rate and the time left (a fake clock drives every case)."""

from __future__ import annotations

import re

from stages.common import ProgressLines


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(total: int | None, seconds_per_step: float, steps: int, every_seconds=30.0, every_fraction=0.1):
    clock, lines, stamps = Clock(), [], []
    bar = ProgressLines(every_seconds, every_fraction, clock, lambda line: (lines.append(line), stamps.append(clock.now)))
    with bar:
        task = bar.add_task("train", total=total)
        for step in range(1, steps + 1):
            clock.now += seconds_per_step
            bar.update(task, completed=step)
    return lines, stamps


def test_a_fast_loop_reports_every_tenth_and_no_more():
    lines, _ = run(total=1000, seconds_per_step=0.01, steps=1000)  # 10 s in all: the fraction decides
    assert [re.search(r"\((\d+)%\)", line).group(1) for line in lines] == [str(p) for p in range(10, 101, 10)]


def test_a_slow_loop_reports_every_30_seconds():
    lines, stamps = run(total=100, seconds_per_step=7.0, steps=100)  # 10% = 70 s: the clock decides
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(lines) == 20 and all(g == 35 for g in gaps)  # the first step past 30 s (5 steps, 5% each time)
    assert "100/100 (100%)" in lines[-1]


def test_both_bounds_are_configurable():
    fast, _ = run(total=1000, seconds_per_step=0.01, steps=1000, every_fraction=0.25)
    assert len(fast) == 4
    slow, stamps = run(total=100, seconds_per_step=7.0, steps=100, every_seconds=100)
    assert all(b - a >= 70 for a, b in zip(stamps, stamps[1:]))  # the 10% bound (70 s) comes first


def test_a_line_says_rate_elapsed_and_time_left():
    lines, _ = run(total=100, seconds_per_step=2.0, steps=50)
    assert lines[-1] == "train: 50/100 (50%), 0.50/s, 1m40s elapsed, 1m40s left"


def test_an_unknown_total_reports_by_time_without_a_time_left():
    lines, stamps = run(total=None, seconds_per_step=1.0, steps=100)
    assert len(lines) == 3 and all("left" not in line and "%" not in line for line in lines)
    assert stamps == [30.0, 60.0, 90.0]
