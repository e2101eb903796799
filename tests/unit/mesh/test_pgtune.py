"""PostgreSQL sizing rules (pgtune-style) and their overrides."""

from __future__ import annotations

from juki.mesh.pgtune import GB, MB, embedded_parameters, parameters, parse_size


def test_a_24_gib_machine_with_2_cores() -> None:
    chosen = parameters(12 * GB, 2)  # the embedded server's half of 24 GiB
    assert chosen["shared_buffers"] == "3GB"
    assert chosen["effective_cache_size"] == "9GB"
    assert chosen["maintenance_work_mem"] == "768MB"
    assert chosen["wal_buffers"] == "16MB"
    # 3 sorts per connection, 1 worker per gather, in whole MB
    assert parse_size(chosen["work_mem"]) == (12 * GB - 3 * GB) // 600 // MB * MB
    assert chosen["max_parallel_workers"] == "2" and chosen["max_parallel_workers_per_gather"] == "1"


def test_small_servers_keep_floors_and_small_volumes_bound_the_wal() -> None:
    chosen = parameters(100 * MB, 1, storage=1 * GB)
    assert chosen["shared_buffers"] == "64MB"  # memory is taken as at least 256 MB
    assert chosen["work_mem"] == "4MB"
    assert chosen["max_wal_size"] == "256MB" and chosen["min_wal_size"] == "64MB"
    assert parameters(64 * GB, 16)["maintenance_work_mem"] == "2GB"  # capped


def test_environment_overrides_one_parameter_or_the_memory() -> None:
    chosen = embedded_parameters({"JUKI_PG_MEMORY": "2Gi", "JUKI_PG_WORK_MEM": "64MB"})
    assert chosen["shared_buffers"] == "512MB"
    assert chosen["work_mem"] == "64MB"
    assert chosen["commit_delay"] == "0"


def test_sizes_parse_in_both_notations() -> None:
    assert parse_size("1Gi") == parse_size("1GB") == GB
    assert parse_size("256Mi") == 256 * MB
    assert parse_size("4096") == 4096
