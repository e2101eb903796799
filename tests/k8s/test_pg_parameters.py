"""Every CloudNativePG Cluster is sized by the same rules as the embedded server (juki.mesh.pgtune)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from juki.mesh.pgtune import parameters, parse_size

from .k8s_policy import Doc


def _cpus(value: str) -> int:
    return max(int(value[:-1]) // 1000, 1) if value.endswith("m") else int(float(value))


def clusters(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d.get("kind") == "Cluster" and d.get("apiVersion", "").startswith("postgresql.cnpg.io")]


def test_every_cluster_has_the_parameters_its_limits_call_for(docs: list[Doc]) -> None:
    found = clusters(docs)
    assert found, "no CloudNativePG Cluster rendered"
    for cluster in found:
        spec = cluster["spec"]
        limits = spec["resources"]["limits"]
        expected = parameters(parse_size(limits["memory"]), _cpus(str(limits["cpu"])),
                              storage=parse_size(spec["storage"]["size"]))
        actual = spec["postgresql"]["parameters"]
        wrong = {k: (actual.get(k), v) for k, v in expected.items() if str(actual.get(k)) != v}
        assert not wrong, f"{cluster['metadata']['name']}: (manifest, pgtune) {wrong}"


def test_the_check_fails_on_a_cluster_given_more_memory(render_overlay: Callable[[str], list[Doc]]) -> None:
    docs = render_overlay("prod")
    clusters(docs)[0]["spec"]["resources"]["limits"]["memory"] = "16Gi"
    with pytest.raises(AssertionError, match="shared_buffers"):
        test_every_cluster_has_the_parameters_its_limits_call_for(docs)
