"""PostgreSQL parameters sized for the memory and cores the server may use (pgtune's rules, OLTP-leaning).

One pure function serves both places the mesh runs PostgreSQL: the embedded server of a local mesh (sized
from this machine, of which it gets a share because the services run beside it) and the CloudNativePG
``Cluster`` manifests (sized from the container's memory and CPU limits; a test checks every manifest
against this function, so the two cannot drift apart). ``JUKI_PG_<NAME>`` overrides one parameter of the
embedded server, e.g. ``JUKI_PG_SHARED_BUFFERS=2GB``; ``JUKI_PG_MEMORY`` sets the memory it may use.

The rules, for a memory budget M and C cores:
- ``shared_buffers`` M/4: PostgreSQL's own cache; the rest of M is left to the kernel's page cache.
- ``effective_cache_size`` 3M/4: what the planner may assume is cached (shared buffers + page cache), so
  index scans of the identity store are preferred over sequential scans.
- ``maintenance_work_mem`` M/16 (at most 2 GB): index builds after a bulk load, VACUUM.
- ``work_mem`` (M - M/4) / (3 x max_connections) / (parallel workers per gather), at least 4 MB: a sort
  or hash per operation, several per query, for every connection at once without swapping.
- ``wal_buffers`` 16 MB (3 % of shared_buffers, at most 16 MB), ``min_wal_size`` 1 GB and
  ``max_wal_size`` 4 GB (at most 1/16 and 1/4 of a volume of known size) with ``checkpoint_completion_target`` 0.9: fewer, smoother checkpoints under the
  steady write load of intake and the access log.
- ``random_page_cost`` 1.1 and ``effective_io_concurrency`` 200: solid-state storage.
- parallel workers from C: ``max_worker_processes``/``max_parallel_workers`` C, per gather and for
  maintenance C/2 (at least 1).
- ``max_connections`` 200: every service's pool at its maximum, plus tools and tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

MB = 1024 * 1024
GB = 1024 * MB
MAX_CONNECTIONS = 200
EMBEDDED_SHARE = 0.5  # of the machine's memory: the mesh's services run on the same machine


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _size(value: int) -> str:
    """A size in the units PostgreSQL reads: whole GB where exact, else MB (never below 1 MB)."""
    if value >= GB and value % GB == 0:
        return f"{value // GB}GB"
    return f"{max(value // MB, 1)}MB"


def parameters(memory: int, cpus: int, max_connections: int = MAX_CONNECTIONS,
               storage: int | None = None) -> dict[str, str]:
    """Parameters for a server that may use ``memory`` bytes and ``cpus`` cores (and ``storage`` of disk)."""
    cpus = max(int(cpus), 1)
    memory = max(int(memory), 256 * MB)
    shared = memory // 4
    per_gather = max(cpus // 2, 1)
    work = max((memory - shared) // (3 * max_connections) // per_gather, 4 * MB)
    return {
        "max_connections": str(max_connections),
        "shared_buffers": _size(shared),
        "effective_cache_size": _size(memory * 3 // 4),
        "maintenance_work_mem": _size(min(memory // 16, 2 * GB)),
        "work_mem": _size(work),
        "wal_buffers": _size(min(max(shared * 3 // 100, MB), 16 * MB)),
        # WAL kept between checkpoints may not fill a small volume: at most a quarter of it.
        "min_wal_size": _size(min(GB, storage // 16)) if storage else "1GB",
        "max_wal_size": _size(min(4 * GB, storage // 4)) if storage else "4GB",
        "checkpoint_completion_target": "0.9",
        "checkpoint_timeout": "15min",
        "random_page_cost": "1.1",
        "effective_io_concurrency": "200",
        "max_worker_processes": str(max(cpus, 2)),
        "max_parallel_workers": str(cpus),
        "max_parallel_workers_per_gather": str(per_gather),
        "max_parallel_maintenance_workers": str(per_gather),
    }


def embedded_parameters(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The embedded server's parameters: this machine's share, then ``JUKI_PG_*`` overrides."""
    env = os.environ if environ is None else environ
    memory = parse_size(env["JUKI_PG_MEMORY"]) if env.get("JUKI_PG_MEMORY") else int(machine_memory() * EMBEDDED_SHARE)
    chosen = parameters(memory, os.cpu_count() or 1)
    chosen["commit_delay"] = "0"
    for key, value in env.items():
        if key.startswith("JUKI_PG_") and key != "JUKI_PG_MEMORY" and value:
            chosen[key[len("JUKI_PG_"):].lower()] = value
    return chosen


def parse_size(text: str) -> int:
    """``512MB``, ``2GB``, ``1Gi``, ``256Mi`` or a number of bytes."""
    text = text.strip()
    units = {"kB": 1024, "KB": 1024, "Ki": 1024, "MB": MB, "Mi": MB, "GB": GB, "Gi": GB, "TB": 1024 * GB,
             "Ti": 1024 * GB}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
