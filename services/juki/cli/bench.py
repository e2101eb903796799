"""``juki bench``: measurements printed as JSON, one sub-verb per module in :data:`BENCH_MODULES`.

Each module exposes ``register_bench(bench_subparsers)`` adding its sub-verb (and setting ``func``).
The benches live in :mod:`juki.bench` (one module each, one shared harness). Add a new one's module to
:data:`BENCH_MODULES`.
"""

from __future__ import annotations

from typing import Any

BENCH_MODULES: tuple[str, ...] = (
    "juki.bench.lookup",
    "juki.bench.accesslog",
    "juki.bench.disclose",
    "juki.bench.intake",
    "juki.bench.soak",
    "juki.bench.load",
    "juki.bench.audit",
)


def register(sub: Any) -> None:
    from juki.cli.main import load_modules  # main imports this module

    bench = sub.add_parser("bench", help="measure throughput and latency; prints one JSON object")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for module in load_modules(BENCH_MODULES):
        module.register_bench(bench_sub)
