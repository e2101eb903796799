"""The project's own deployment policies, on every overlay, and proof that each check can fail."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

import pytest

from .k8s_policy import (
    AGENCY,
    Doc,
    certificate_violations,
    config_of,
    containers,
    juki_deployments,
    juki_workload_violations,
    name,
    network_coverage_violations,
    of_kind,
    pod_spec,
    provided_secrets,
    referenced_secrets,
    required_cluster_secrets,
    trust_model_violations,
    workload_violations,
)

TARGET = re.compile(r"^dns:///(?P<service>[a-z0-9-]+)\.juki\.svc\.cluster\.local:50051$")


def deployment(docs: list[Doc], wanted: str) -> Doc:
    return next(d for d in of_kind(docs, "Deployment") if name(d) == wanted)


# --- workloads -------------------------------------------------------------------------------------
def test_every_deployment_is_hardened_with_probes_and_limits(docs: list[Doc]) -> None:
    problems = [p for d in of_kind(docs, "Deployment") for p in workload_violations(d)]
    assert not problems, "\n".join(problems)


def test_every_juki_service_probes_grpc_health_and_drains_on_shutdown(docs: list[Doc]) -> None:
    problems = [p for d in juki_deployments(docs) for p in juki_workload_violations(docs, d)]
    assert not problems, "\n".join(problems)


def test_one_image_for_every_juki_container(overlay: str, docs: list[Doc]) -> None:
    images = {c["image"] for d in juki_deployments(docs) for c in containers(d)}
    assert len(images) == 1, images
    (image,) = images
    assert not image.endswith(":latest") and ":" in image
    assert image == {"dev": "juki:dev", "prod": "registry.example.com/juki/juki:0.1.0"}[overlay]


def test_the_service_is_chosen_by_argument(docs: list[Doc]) -> None:
    for d in juki_deployments(docs):
        (server,) = pod_spec(d)["containers"]
        assert "command" not in server, "the image's ENTRYPOINT (juki serve) must stay in force"
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        assert server["args"][0] == component
        (migrate,) = pod_spec(d)["initContainers"]
        assert migrate["command"][:4] == ["juki", "migrate", "--service", component]


def test_every_juki_service_is_headless_and_selects_its_deployment(docs: list[Doc]) -> None:
    deployments = {name(d): d for d in juki_deployments(docs)}
    services = [
        s
        for s in of_kind(docs, "Service")
        if s["metadata"]["labels"].get("app.kubernetes.io/part-of") == "juki"
    ]
    assert sorted(name(s) for s in services) == sorted(deployments)
    for service in services:
        assert service["spec"]["clusterIP"] == "None", "per-call round robin needs every pod address in DNS"
        assert {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP"} in service["spec"][
            "ports"
        ]
        labels = deployments[name(service)]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_every_peer_address_is_a_dns_target_of_a_headless_service(docs: list[Doc]) -> None:
    services = {name(s) for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"}
    municipal = {name(d) for d in juki_deployments(docs) if name(d).startswith("municipal-")}
    for d in juki_deployments(docs):
        env = config_of(docs, d, pod_spec(d)["containers"][0])
        for key, value in env.items():
            if key.endswith("_ADDRESS"):
                match = TARGET.match(value)
                assert match and match["service"] in services, f"{name(d)} {key}={value}"
        if "JUKI_MUNICIPAL_ADDRESSES" in env:
            directory = dict(item.split("=", 1) for item in env["JUKI_MUNICIPAL_ADDRESSES"].split(","))
            assert {f"municipal-{code}" for code in directory} == municipal, (
                "directory lists every municipality"
            )
            for code, value in directory.items():
                match = TARGET.match(value)
                assert match and match["service"] == f"municipal-{code}"


def test_every_referenced_secret_and_configmap_exists(overlay: str, docs: list[Doc]) -> None:
    configmaps = {name(c) for c in of_kind(docs, "ConfigMap")}
    provided = provided_secrets(docs)
    missing: set[str] = set()
    for d in of_kind(docs, "Deployment"):
        missing |= referenced_secrets(d) - provided
        for container in containers(d):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
    missing |= required_cluster_secrets(docs) - provided
    if overlay == "dev":
        assert not missing
    else:
        # Production's passwords and pseudonym key come from a secret store, never from git.
        assert all(s.startswith("juki-db-") or s == "juki-pseudonym-key" for s in missing), missing
        assert not of_kind(docs, "Secret"), "no Secret may be rendered into production manifests"


def test_each_service_logs_in_with_its_own_managed_role(docs: list[Doc]) -> None:
    from juki.mesh import settings
    clusters = {name(c): c for c in of_kind(docs, "Cluster")}
    for d in juki_deployments(docs):
        server = pod_spec(d)["containers"][0]
        env = config_of(docs, d, server)
        assert env["JUKI_DATABASE_USER"] == settings.role_name(name(d)), (
            "the role the app's migrations grant to"
        )
        cluster = clusters[env["JUKI_DATABASE_HOST"].rsplit("-", 1)[0]]
        roles = {r["name"]: r for r in cluster["spec"]["managed"]["roles"]}
        role = roles[env["JUKI_DATABASE_USER"]]
        assert not role["superuser"] and not role["createrole"] and not role["createdb"]
        volumes = {v["name"]: v for v in pod_spec(d)["volumes"]}
        assert volumes["db"]["secret"]["secretName"] == role["passwordSecret"]["name"]
        migrate = pod_spec(d)["initContainers"][0]
        migrate_env = config_of(docs, d, migrate)
        assert migrate_env["JUKI_DATABASE_USER"] == cluster["spec"]["bootstrap"]["initdb"]["owner"]
        assert migrate_env["JUKI_DATABASE_HOST"] == f"{name(cluster)}-rw", "migrations go to the primary"


# --- certificates, network, scaling ----------------------------------------------------------------
def test_every_juki_service_has_its_spiffe_certificate(docs: list[Doc]) -> None:
    problems = certificate_violations(docs)
    assert not problems, "\n".join(problems)


def test_every_workload_is_covered_by_a_network_policy_under_default_deny(docs: list[Doc]) -> None:
    problems = network_coverage_violations(docs)
    assert not problems, "\n".join(problems)


def test_network_policies_allow_exactly_the_trust_model(docs: list[Doc]) -> None:
    problems = trust_model_violations(docs)
    assert not problems, "\n".join(problems)


def test_lookup_is_autoscaled_and_leaves_its_replica_count_to_the_hpa(overlay: str, docs: list[Doc]) -> None:
    (hpa,) = [
        h for h in of_kind(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "lookup"
    ]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert any(m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert "replicas" not in deployment(docs, "lookup")["spec"], (
        "a replicas field would fight the HPA on every apply"
    )
    assert hpa["spec"]["minReplicas"] >= (3 if overlay == "prod" else 1)


def test_every_juki_service_has_a_disruption_budget(docs: list[Doc]) -> None:
    budgets = of_kind(docs, "PodDisruptionBudget")
    for d in juki_deployments(docs):
        labels = d["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, name(d)


def test_dev_runs_single_replicas(render_overlay: Callable[[str], list[Doc]]) -> None:
    docs = render_overlay("dev")
    assert all(d["spec"].get("replicas", 1) == 1 for d in of_kind(docs, "Deployment"))
    assert all(c["spec"]["instances"] == 1 for c in of_kind(docs, "Cluster"))


def test_prod_runs_tiers_as_separate_replicated_spread_deployments(
    render_overlay: Callable[[str], list[Doc]],
) -> None:
    docs = render_overlay("prod")
    juki = {name(d): d for d in juki_deployments(docs)}
    for code in ("13", "27", "14"):
        server = pod_spec(juki[f"intake-prefecture-{code}"])["containers"][0]
        assert server["args"] == ["intake", "--tier", "prefecture", "--prefecture", code]
    assert pod_spec(juki["intake-national"])["containers"][0]["args"] == ["intake", "--tier", "national"]
    assert len([n for n in juki if n.startswith("municipal-")]) >= 3
    for n, d in juki.items():
        if n != "lookup":
            assert d["spec"]["replicas"] >= 2, n
        spec = pod_spec(d)
        assert spec["affinity"]["podAntiAffinity"], n
        assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} == {
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
        }, n
    assert all(c["spec"]["instances"] >= 3 for c in of_kind(docs, "Cluster"))
    lookup = config_of(docs, juki["lookup"], pod_spec(juki["lookup"])["containers"][0])
    assert lookup["JUKI_DATABASE_HOST"] == "juki-db-ro", "lookup reads from the standbys"


def test_observability_stack_and_scrape_annotations(docs: list[Doc]) -> None:
    names = {name(d) for d in of_kind(docs, "Deployment")}
    assert {"otel-collector", "jaeger"} <= names
    for d in juki_deployments(docs):
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9464"
        env = config_of(docs, d, pod_spec(d)["containers"][0])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.juki.svc.cluster.local:4317"
        assert env["OTEL_SERVICE_NAME"] == name(d)


# --- the checks themselves fail on broken manifests ------------------------------------------------
def _server(d: Doc) -> Doc:
    return pod_spec(d)["containers"][0]


BREAKAGES: list[tuple[str, Callable[[Doc], Any]]] = [
    ("no readiness probe", lambda d: _server(d).pop("readinessProbe")),
    ("no liveness probe", lambda d: _server(d).pop("livenessProbe")),
    (
        "root user",
        lambda d: (
            pod_spec(d)["securityContext"].update(runAsNonRoot=False),
            _server(d)["securityContext"].update(runAsNonRoot=False),
        ),
    ),
    ("writable root", lambda d: _server(d)["securityContext"].update(readOnlyRootFilesystem=False)),
    ("escalation", lambda d: _server(d)["securityContext"].update(allowPrivilegeEscalation=True)),
    ("capabilities kept", lambda d: _server(d)["securityContext"].pop("capabilities")),
    ("no limits", lambda d: _server(d)["resources"].pop("limits")),
    (
        "init container without requests",
        lambda d: pod_spec(d)["initContainers"][0]["resources"].pop("requests"),
    ),
    ("token mounted", lambda d: pod_spec(d).update(automountServiceAccountToken=True)),
]


@pytest.mark.parametrize(("label", "breakage"), BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_workload_check_catches(
    render_overlay: Callable[[str], list[Doc]], label: str, breakage: Callable[[Doc], Any]
) -> None:
    d = deployment(render_overlay("dev"), "lookup")
    assert not workload_violations(d)
    breakage(d)
    assert workload_violations(d), label


def test_juki_check_catches_a_probe_on_the_mtls_port(render_overlay: Callable[[str], list[Doc]]) -> None:
    docs = render_overlay("dev")
    d = deployment(docs, "card")
    _server(d)["livenessProbe"] = {"grpc": {"port": 50051}}
    assert any("livenessProbe" in p for p in juki_workload_violations(docs, d))


def test_certificate_check_catches_a_wrong_identity(render_overlay: Callable[[str], list[Doc]]) -> None:
    docs = render_overlay("dev")
    cert = next(c for c in of_kind(docs, "Certificate") if name(c) == "lookup")
    cert["spec"]["uris"] = ["spiffe://juki.local/agency/jps"]
    assert any("Service/lookup" in p for p in certificate_violations(docs))


def test_coverage_check_catches_a_missing_default_deny_and_an_uncovered_pod(
    render_overlay: Callable[[str], list[Doc]],
) -> None:
    docs = [
        d
        for d in render_overlay("dev")
        if not (d["kind"] == "NetworkPolicy" and name(d) in ("default-deny", "card"))
    ]
    problems = network_coverage_violations(docs)
    assert any("default-deny" in p for p in problems)
    assert any(p.startswith("card:") for p in problems)


def test_trust_model_check_catches_an_extra_path(render_overlay: Callable[[str], list[Doc]]) -> None:
    docs = render_overlay("dev")
    for policy in of_kind(docs, "NetworkPolicy"):
        if name(policy) == "lookup":
            policy["spec"]["egress"].append(
                {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "card"}}}]}
            )
        if name(policy) == "card":
            policy["spec"]["ingress"].append({"from": [{"podSelector": {}}]})
    problems = trust_model_violations(docs)
    assert "gRPC path allowed but not in the trust model: lookup -> card" in problems


def test_trust_model_check_catches_a_blocked_path_and_an_open_namespace(
    render_overlay: Callable[[str], list[Doc]],
) -> None:
    docs = render_overlay("dev")
    lookup = next(p for p in of_kind(docs, "NetworkPolicy") if name(p) == "lookup")
    lookup["spec"]["ingress"] = []
    assert f"trust-model gRPC path blocked: {AGENCY.name} -> lookup" in trust_model_violations(docs)
    open_docs = [d for d in render_overlay("dev") if d["kind"] != "NetworkPolicy"]
    assert len(trust_model_violations(open_docs)) > 20


def test_prod_never_renders_dev_secrets(render_overlay: Callable[[str], list[Doc]]) -> None:
    text = repr(render_overlay("prod"))
    assert "dev-only" not in text
    for secret in of_kind(render_overlay("dev"), "Secret"):
        values = [base64.b64decode(v).decode() for v in secret["data"].values()]
        assert any(v.startswith("dev-only") for v in values), name(secret)
