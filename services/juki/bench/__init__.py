"""The benchmarks behind ``juki bench``: one module per bench, one shared :mod:`.harness`.

Each bench module has ``register_bench(bench_subparsers)``, which adds its sub-verb and sets ``func``;
:mod:`juki.cli.bench` lists the modules. The harness builds the throwaway place a bench measures in
(temporary directory, CA, embedded PostgreSQL, server processes, an echo server for the ceiling) and
holds the measuring tools (CPU by process, percentiles, the JSON output).

Nothing in a service imports this package; the service image carries it only as part of the package.
"""
