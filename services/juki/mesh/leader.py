"""A lease that one replica at a time holds, across every replica of a service on one database.

Outbox relays (the prefecture's relay to the national intake, a municipal CS's sender to its prefecture)
must not send the same rows from two replicas at once. The lease is a PostgreSQL session advisory lock
held by a connection of its own: the replica whose session holds the lock relays; the others try again
every ``retry_seconds``. When the holder dies (or its database session does), PostgreSQL releases the lock
and another replica takes over within ``retry_seconds``. The holder does its outbox reads on the lease's
own connection, so a holder that lost its session without noticing cannot read, and so cannot send,
anything (no window where two replicas relay).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct

import asyncpg

from juki.mesh.db import is_connection_loss
from juki.mesh.settings import DatabaseSettings

log = logging.getLogger(__name__)


def lease_key(name: str) -> int:
    """The advisory-lock key of a lease name (64-bit, stable across processes and versions)."""
    return int(struct.unpack(">q", hashlib.blake2b(f"lease:{name}".encode(), digest_size=8).digest())[0])


class LeaderLease:
    """The lease ``name``: ``await acquire()`` returns the connection that holds it."""

    def __init__(self, database: DatabaseSettings, name: str, *, retry_seconds: float = 0.5) -> None:
        self._database = database
        self.name = name
        self._key = lease_key(name)
        self._retry = retry_seconds
        self._conn: asyncpg.Connection | None = None
        self.held = False

    async def acquire(self) -> asyncpg.Connection:
        """Wait until this replica holds the lease; the holding connection (use it for the outbox reads)."""
        waited = False
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self._database.url.reveal(),
                        server_settings={"search_path": f"{self._database.schema},public",
                                         "application_name": f"lease:{self.name}"},
                    )
                if await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key):
                    if waited:
                        log.warning("took over the lease %s", self.name)
                    self.held = True
                    return self._conn
            except Exception as error:
                if not is_connection_loss(error):
                    raise
                await self._drop()
            if not waited:
                log.info("lease %s is held by another replica; standing by", self.name)
                waited = True
            await asyncio.sleep(self._retry)

    async def lost(self) -> None:
        """The holder's session failed: forget it (PostgreSQL has released the lock with the session)."""
        self.held = False
        await self._drop()

    async def release(self) -> None:
        self.held = False
        if self._conn is not None and not self._conn.is_closed():
            try:
                await self._conn.execute("SELECT pg_advisory_unlock($1)", self._key)
            except Exception as error:
                if not is_connection_loss(error):
                    raise
        await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
