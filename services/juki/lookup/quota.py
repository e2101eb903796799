"""Per-agency request quotas, shared by every lookup replica: one token bucket per recipient in PostgreSQL.

The bucket (table ``quota_buckets``) refills at the 別表 row's rate up to one second's worth (at least
one request). A replica does not ask PostgreSQL per call: it leases a chunk of tokens — a tenth of a
second's worth, at least the cost of the call at hand — in one statement, and spends it locally. Tokens
leave the shared bucket before they are spent, so all replicas together never grant more than the rate
allows (capacity + rate x t over any interval t). The tolerance is the other way only: a replica may be
refused while other replicas still hold unspent leased tokens, at most a tenth of a second's worth each
(tokens a replica holds when it stops are lost).

A refusal carries the time until the bucket holds enough again, sent to the caller as RetryInfo.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from juki.mesh.errors import JukiError, Reason

LEASE_SECONDS = 0.1  # a lease is this many seconds' worth of the rate

_CREATE = "INSERT INTO quota_buckets (recipient, tokens) VALUES ($1, $2) ON CONFLICT (recipient) DO NOTHING"
# One statement: refill by the time passed (capped at the capacity), take up to $3, return what was taken
# and what was there. The row lock serialises replicas leasing for the same recipient.
_LEASE = """
WITH current AS (
    SELECT LEAST($2::float8, tokens + EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float8 * $4::float8)
           AS available
    FROM quota_buckets WHERE recipient = $1 FOR UPDATE
)
UPDATE quota_buckets AS b
SET tokens = current.available - LEAST($3::float8, GREATEST(current.available, 0)), updated_at = clock_timestamp()
FROM current WHERE b.recipient = $1
RETURNING LEAST($3::float8, GREATEST(current.available, 0)) AS granted, current.available
"""


@dataclass
class _Held:
    tokens: float = 0.0
    created: bool = False


class Quotas:
    """Token buckets keyed by recipient, leased from the shared table; ``await take(...)`` per call."""

    def __init__(self, pool: asyncpg.Pool, multiplier: float = 1.0) -> None:
        self._pool = pool
        self._multiplier = multiplier
        self._held: dict[str, _Held] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def take(self, recipient: str, rate_per_second: int, cost: float = 1.0) -> None:
        """Spend ``cost`` tokens of ``recipient`` or raise QUOTA_EXCEEDED with a retry hint."""
        held = self._held.get(recipient)
        if held is not None and held.tokens >= cost:  # the common case: no database round trip
            held.tokens -= cost
            return
        rate = rate_per_second * self._multiplier
        if rate <= 0:
            raise JukiError(Reason.QUOTA_EXCEEDED, f"{recipient} has no request quota")
        capacity = max(rate, 1.0)
        lock = self._locks.setdefault(recipient, asyncio.Lock())
        async with lock:  # one lease at a time per recipient in this replica; the others then find tokens
            held = self._held.setdefault(recipient, _Held())
            if held.tokens < cost:
                if not held.created:
                    await self._pool.execute(_CREATE, recipient, capacity)
                    held.created = True
                want = max(cost - held.tokens, rate * LEASE_SECONDS)
                row = await self._pool.fetchrow(_LEASE, recipient, capacity, want, rate)
                if row is None:  # the row vanished (an operator reset the table): create it again
                    held.created = False
                else:
                    held.tokens += float(row["granted"])
            if held.tokens < cost:
                wait = (cost - held.tokens) / rate
                raise JukiError(
                    Reason.QUOTA_EXCEEDED,
                    f"{recipient} exceeded its quota of {rate:g} requests per second",
                    retry_after_seconds=round(wait, 3),
                )
            held.tokens -= cost
