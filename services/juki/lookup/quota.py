"""Per-agency request quotas: a token bucket per recipient, refilled at the 別表 row's rate."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from juki.mesh.errors import JukiError, Reason


@dataclass
class _Bucket:
    tokens: float
    updated: float


class Quotas:
    """Token buckets keyed by recipient; capacity is one second's worth of requests (at least one).

    A refusal carries the time until a token is available again, sent to the caller as RetryInfo.
    """

    def __init__(self, multiplier: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._multiplier = multiplier
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, recipient: str, rate_per_second: int, cost: float = 1.0) -> None:
        """Spend ``cost`` tokens of ``recipient`` or raise QUOTA_EXCEEDED with a retry hint."""
        rate = rate_per_second * self._multiplier
        if rate <= 0:
            raise JukiError(Reason.QUOTA_EXCEEDED, f"{recipient} has no request quota")
        capacity = max(rate, 1.0)
        now = self._clock()
        bucket = self._buckets.get(recipient)
        if bucket is None:
            bucket = self._buckets[recipient] = _Bucket(capacity, now)
        else:
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
        if bucket.tokens < cost:
            wait = (cost - bucket.tokens) / rate
            raise JukiError(
                Reason.QUOTA_EXCEEDED,
                f"{recipient} exceeded its quota of {rate:g} requests per second",
                retry_after_seconds=round(wait, 3),
            )
        bucket.tokens -= cost
