"""The per-key token buckets that pace log lines and DISCONNECTs: time passed in, no sleeps."""

from __future__ import annotations

import pytest

from zrouter.ratelimit import RateLimiter


def test_a_key_passes_its_burst_at_once_then_at_the_rate() -> None:
    lim = RateLimiter(rate=2.0, burst=3)
    assert [lim.take("a", 0.0) for _ in range(4)] == [0, 0, 0, None]
    assert lim.take("a", 0.4) is None  # 0.8 of a token
    assert lim.take("a", 0.5) == 2  # one token back; it says how many were refused meanwhile
    assert lim.take("a", 0.5) is None
    assert lim.take("a", 100.0) == 1  # refill is capped at the burst
    assert [lim.allow("a", 100.0) for _ in range(3)] == [True, True, False]


def test_keys_are_independent() -> None:
    lim = RateLimiter(rate=1.0, burst=1)
    assert lim.allow("a", 0.0) and lim.allow("b", 0.0)
    assert not lim.allow("a", 0.5) and not lim.allow("b", 0.5)
    assert lim.allow("a", 1.0)


def test_one_pass_per_interval_is_rate_one_over_interval_burst_one() -> None:
    lim = RateLimiter(rate=1 / 0.25, burst=1)
    passed = [t / 100 for t in range(0, 200) if lim.allow(b"peer", t / 100)]  # every 10 ms for 2 s
    assert passed == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def test_memory_is_bounded_by_forgetting_the_least_recently_used_key() -> None:
    lim = RateLimiter(rate=1.0, burst=1, max_keys=3)
    for k in "abc":
        assert lim.allow(k, 0.0)
    assert not lim.allow("a", 0.0)  # "a" is now the most recently used; "b" the least
    assert lim.allow("d", 0.0)
    assert len(lim) == 3
    assert lim.allow("b", 0.0)  # forgotten, so it starts again from a full bucket
    assert not lim.allow("a", 0.0) and not lim.allow("d", 0.0)
    for n in range(10_000):
        lim.take(n, 1.0)
    assert len(lim) == 3


def test_time_going_backwards_grants_nothing() -> None:
    lim = RateLimiter(rate=1.0, burst=1)
    assert lim.allow("a", 10.0)
    assert not lim.allow("a", 5.0)
    assert lim.allow("a", 11.0)


def test_forget_gives_a_key_a_full_bucket() -> None:
    lim = RateLimiter(rate=0.001, burst=1)
    assert lim.allow("a", 0.0) and not lim.allow("a", 0.0)
    lim.forget("a")
    lim.forget("never-seen")
    assert lim.allow("a", 0.0)


@pytest.mark.parametrize("kw", [{"rate": 0}, {"rate": -1}, {"rate": 1, "burst": 0.5}, {"rate": 1, "max_keys": 0},
                                {"rate": float("nan")}])
def test_nonsense_settings_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateLimiter(**kw)  # type: ignore[arg-type]
