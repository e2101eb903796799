"""What keeps replicas of one service on one database correct: agency quotas shared through PostgreSQL,
and the leader lease that lets only one replica relay an outbox (taken over when the holder dies)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from juki.lookup.quota import LEASE_SECONDS, Quotas
from juki.mesh import db
from juki.mesh.errors import JukiError
from juki.mesh.leader import LeaderLease


async def test_two_replicas_grant_one_quota_not_two(database: Any) -> None:
    pools = [await db.create_pool(database.settings("lookup"), f"quota-test-{i}") for i in range(2)]
    try:
        replicas = [Quotas(pool) for pool in pools]
        recipient = f"spiffe://juki.local/agency/quota-test-{time.monotonic_ns()}"
        rate = 40  # per second; capacity one second's worth
        granted = refused = 0
        started = time.monotonic()

        async def hammer(quotas: Quotas) -> None:
            nonlocal granted, refused
            while time.monotonic() - started < 1.0:
                try:
                    await quotas.take(recipient, rate)
                    granted += 1
                except JukiError as error:
                    assert error.reason.name == "QUOTA_EXCEEDED" and error.retry_after_seconds is not None
                    refused += 1
                    await asyncio.sleep(0.005)

        await asyncio.gather(*(hammer(q) for q in replicas for _ in range(4)))
        elapsed = time.monotonic() - started
    finally:
        for pool in pools:
            await pool.close()
    # Tokens leave the shared bucket before they are spent: together the replicas never exceed the bucket
    # (capacity + rate x elapsed), where two separate buckets would grant about twice that.
    assert granted <= rate + rate * elapsed + 1e-9, (granted, elapsed)
    # ... and the quota is still used: at most a lease's worth per replica is left unspent.
    assert granted >= rate + rate * 0.5 - 2 * rate * LEASE_SECONDS, (granted, elapsed)
    assert refused > 0


async def test_only_one_replica_holds_the_lease_and_another_takes_over(database: Any) -> None:
    settings = database.settings("intake-prefecture-13")
    name = f"test-{time.monotonic_ns()}"
    first, second = LeaderLease(settings, name, retry_seconds=0.05), LeaderLease(settings, name, retry_seconds=0.05)
    holder = await first.acquire()
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(0.3)
    assert not waiting.done(), "two replicas hold one lease"
    holder.terminate()  # the holder's session dies (a killed replica): PostgreSQL releases the lock
    taken_over = await asyncio.wait_for(waiting, timeout=10)
    assert second.held and not taken_over.is_closed()
    # The old holder, back, waits for the new one.
    back = asyncio.create_task(first.acquire())
    await asyncio.sleep(0.3)
    assert not back.done()
    await second.release()
    await asyncio.wait_for(back, timeout=10)
    assert first.held
    await first.release()
