"""bench.peers.PipeCounter: the pipelined runs' window and pacing (pure logic: a fake clock)."""

from __future__ import annotations

from bench.peers import PACE_SLACK, PipeCounter


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_unpaced_counter_never_sleeps_and_measures_its_window() -> None:
    t = FakeTime()
    c = PipeCounter(1.0, 2.0, clock=t.clock, sleep=t.sleep)
    stopped = []
    for _ in range(40_000):
        t.now += 0.0001  # 10,000 completions a second
        stopped.append(c.done())
    assert t.slept == []
    assert stopped.index(True) == 29_999  # the first completion at or past start + 1 + 2 s
    res = c.result()
    assert res["measured"] == 20_000 and abs(res["rate"] - 10_000) < 1


def test_paced_counter_holds_a_faster_driver_to_the_pace() -> None:
    t = FakeTime()
    c = PipeCounter(0.5, 2.0, clock=t.clock, sleep=t.sleep, pace=1_000.0)
    while not c.done():
        t.now += 0.00001  # the driver could do 100,000 a second
    res = c.result()
    assert abs(res["rate"] - 1_000) < 10
    assert t.slept and all(s > PACE_SLACK for s in t.slept)


def test_paced_counter_does_not_slow_a_driver_that_is_behind() -> None:
    t = FakeTime()
    c = PipeCounter(0.5, 2.0, clock=t.clock, sleep=t.sleep, pace=50_000.0)
    while not c.done():
        t.now += 0.0001  # 10,000 a second: behind the pace all along
    assert t.slept == []
    assert abs(c.result()["rate"] - 10_000) < 1
