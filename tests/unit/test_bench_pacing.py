"""bench.peers.PipeCounter: the pipelined runs' window and pacing (pure logic: a fake clock)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from bench.peers import PipeCounter


class FakeTime:
    """A clock in exact fractions of a second, so the tests can compare times exactly."""

    def __init__(self) -> None:
        self.now = Fraction(100)
        self.slept: list[Fraction] = []

    def clock(self) -> Fraction:
        return self.now

    def sleep(self, s: Fraction) -> None:
        self.slept.append(s)
        self.now += s


def drive(c: PipeCounter, t: FakeTime, step: Fraction, limit: int = 1_000_000) -> int:
    """Complete one request every ``step`` s (as fast as the driver goes) until told to stop."""
    for i in range(limit):
        t.now += step
        if c.done():
            return i + 1
    raise AssertionError("the counter never said stop")


def test_unpaced_counter_never_sleeps_and_measures_its_window() -> None:
    t = FakeTime()
    c = PipeCounter(1, 2, clock=t.clock, sleep=t.sleep)  # type: ignore[arg-type]
    n = drive(c, t, Fraction(1, 10_000))  # 10,000 completions a second
    assert t.slept == []
    assert n == 30_000  # the first completion at start + 1 + 2 s
    assert c.at_window_start == (10_000, 101) and c.at_window_end == (30_000, 103)
    assert c.result() == {"rate": 10_000, "measured": 20_000, "total": 30_000}


def test_paced_counter_holds_a_faster_driver_to_the_pace_in_bursts() -> None:
    t = FakeTime()
    c = PipeCounter(Fraction(1, 2), 2, clock=t.clock, sleep=t.sleep, pace=Fraction(1_000), burst=10)  # type: ignore[arg-type]
    drive(c, t, Fraction(1, 100_000))  # the driver could do 100,000 a second
    assert c.result()["rate"] == pytest.approx(1_000, rel=0.001)
    # Sleeps come every 10 completions, each until that completion's due time: a 10 ms period
    # of which the driver's 10 completions took 0.1 ms.
    assert t.slept == [Fraction(1, 100) - Fraction(10, 100_000)] * len(t.slept)
    assert len(t.slept) == 250  # 2.5 s at 100 sleeps a second


def test_paced_counter_does_not_slow_a_driver_that_is_behind() -> None:
    t = FakeTime()
    c = PipeCounter(Fraction(1, 2), 2, clock=t.clock, sleep=t.sleep, pace=50_000)  # type: ignore[arg-type]
    drive(c, t, Fraction(1, 10_000))  # 10,000 a second: behind the pace all along
    assert t.slept == []
    assert c.result()["rate"] == 10_000


def test_a_stall_does_not_turn_into_a_catch_up_burst() -> None:
    t = FakeTime()
    c = PipeCounter(10, 10, clock=t.clock, sleep=t.sleep, pace=Fraction(1_000), burst=10)  # type: ignore[arg-type]
    for _ in range(100):
        t.now += Fraction(1, 100_000)
        c.done()
    t.now += 1  # a one-second stall: 1,000 completions behind the schedule
    fast = 0
    while not t.slept or t.now < 102:
        before = len(t.slept)
        t.now += Fraction(1, 100_000)
        c.done()
        fast += len(t.slept) == before
        if len(t.slept) > before:
            break
    # Back to sleeping after two bursts' worth (the 10 it may stay late, then 10 early), not
    # after 1,000 catch-up replies.
    assert fast == 20


def test_pacing_stops_with_the_window_so_the_last_replies_drain_at_once() -> None:
    t = FakeTime()
    c = PipeCounter(Fraction(1, 2), 1, clock=t.clock, sleep=t.sleep, pace=1_000, burst=10)  # type: ignore[arg-type]
    drive(c, t, Fraction(1, 100_000))
    slept = len(t.slept)
    for _ in range(100):  # the requests still in flight when the window closed
        t.now += Fraction(1, 100_000)
        assert c.done() is True
    assert len(t.slept) == slept


@pytest.mark.parametrize("kw", [{"pace": -1.0}, {"pace": 1000.0, "burst": 0}])
def test_nonsense_pacing_is_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PipeCounter(0.5, 1.0, **kw)  # type: ignore[arg-type]
