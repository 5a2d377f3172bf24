"""Token buckets keyed by peer, in bounded memory: for log lines and answers a peer can provoke.

A misbehaving peer must not be able to flood the log, nor make the broker answer it faster than a
well-behaved peer needs answers. :class:`RateLimiter` keeps one token bucket per key (a peer's
routing id, say): a key may pass ``burst`` times at once, then ``rate`` times per second on
average (the token bucket of network traffic shaping; see e.g. RFC 2697's committed burst). At
most ``max_keys`` buckets are kept; the least recently used is forgotten first, which costs at
worst one extra pass to a key that comes back after being forgotten.

Pure logic: time is passed in (seconds, any monotonic clock), nothing sleeps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["RateLimiter"]


class _Bucket:
    __slots__ = ("at", "refused", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at  # when ``tokens`` was last brought up to date
        self.refused = 0  # takes refused since the last one that passed


class RateLimiter:
    """Per-key token buckets: ``burst`` passes at once, then ``rate`` per second, per key.

    ``take(key, now)`` answers whether the key may pass now (using up a token if so) and how
    many of its takes were refused since its last pass, so a log line can say what it stood
    for. Memory: at most ``max_keys`` buckets (about 150 bytes each plus the key).

    Raises ValueError for a ``rate`` that is not positive, a ``burst`` below 1 or a
    ``max_keys`` below 1.
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float = 1.0, max_keys: int = 1024) -> None:
        if not rate > 0 or not burst >= 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_keys >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, now: float) -> int | None:
        """None if ``key`` must not pass now; else the number of its takes refused since its
        last pass (0 usually), a token being used up."""
        buckets = self._buckets
        b = buckets.get(key)
        if b is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
            b = buckets[key] = _Bucket(self.burst, now)
        else:
            buckets.move_to_end(key)
            if now > b.at:
                b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
                b.at = now
        if b.tokens < 1.0:
            b.refused += 1
            return None
        b.tokens -= 1.0
        refused = b.refused
        b.refused = 0
        return refused

    def allow(self, key: Hashable, now: float) -> bool:
        """``take`` as a yes or no."""
        return self.take(key, now) is not None

    def forget(self, key: Hashable) -> None:
        """Drop ``key``'s bucket (its next take starts from a full bucket)."""
        self._buckets.pop(key, None)
