"""``juki bench``: measurements printed as JSON, one sub-verb per module in :data:`BENCH_MODULES`.

Each module exposes ``register_bench(bench_subparsers)`` adding its sub-verb (and setting ``func``).
"""

from __future__ import annotations

from typing import Any

BENCH_MODULES: tuple[str, ...] = (
    "juki.cli.bench_lookup",
    "juki.cli.bench_accesslog",
    "juki.cli.bench_audit",
    "juki.cli.bench_disclose",
    "juki.cli.bench_intake",
    "juki.cli.bench_soak",
)


def register(sub: Any) -> None:
    from juki.cli.main import load_modules  # main imports this module

    bench = sub.add_parser("bench", help="measure throughput and latency; prints one JSON object")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for module in load_modules(BENCH_MODULES):
        module.register_bench(bench_sub)
