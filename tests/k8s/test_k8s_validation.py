"""Every overlay renders and validates offline.

Built-in kinds are validated strictly (unknown fields refused) against the Kubernetes OpenAPI schemas
bundled in kubernetes-validate. That tool has no schema for custom resources: for them it only warns
and its CLI exits 0, so the CRD kinds used here are checked against crd_schemas.py instead, and any
other kind without a schema fails the test rather than passing unnoticed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, latest_version

from .crd_schemas import SCHEMAS
from .k8s_policy import K8S, OVERLAYS, Doc, kubectl, name

KUBERNETES_VERSION = latest_version()


def strict_errors(doc: Doc) -> list[str]:
    """Strict validation of one document: built-in kinds by kubernetes-validate, CRDs by our schemas."""
    key = (doc["apiVersion"], doc["kind"])
    where = f"{doc['kind']}/{name(doc)}"
    if key in SCHEMAS:
        validator = jsonschema.Draft202012Validator(SCHEMAS[key])
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except ValidationError as error:
        return [f"{where}: {'.'.join(map(str, error.path))}: {error.message}"]
    except SchemaNotFoundError as error:
        return [f"{where}: no schema anywhere for this kind ({error.message})"]
    return []


def test_every_overlay_and_component_directory_is_known() -> None:
    assert sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()) == sorted(OVERLAYS)
    for component in (K8S / "components").iterdir():
        assert (component / "kustomization.yaml").read_text().count("kind: Component") == 1, component


def test_overlay_renders_every_kind_we_expect(docs: list[Doc]) -> None:
    kinds = {doc["kind"] for doc in docs}
    assert kinds >= {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "NetworkPolicy",
        "Certificate",
        "Issuer",
        "Cluster",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    assert all(doc["metadata"].get("namespace") == "juki" for doc in docs if doc["kind"] != "Namespace")


def test_overlay_validates_strictly(docs: list[Doc]) -> None:
    errors = [error for doc in docs for error in strict_errors(doc)]
    assert not errors, "\n".join(errors)


def test_builtin_kinds_are_checked_by_kubernetes_validate_not_our_schemas(docs: list[Doc]) -> None:
    builtin = [doc for doc in docs if (doc["apiVersion"], doc["kind"]) not in SCHEMAS]
    assert {doc["kind"] for doc in builtin} >= {
        "Deployment",
        "Service",
        "NetworkPolicy",
        "HorizontalPodAutoscaler",
    }
    for doc in builtin:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_cli_strict_passes_and_warns_only_for_the_crd_kinds(overlay: str, tmp_path: Path) -> None:
    """What CI's `kubernetes-validate --strict` prints: no error, and a warning (not a pass) for CRDs."""
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(
        subprocess.run(
            [str(kubectl()), "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert not [line for line in lines if not line.startswith("WARN")], result.stdout
    unschemed = {line.split("kind ")[1].split(" ")[0] for line in lines}
    # The alert rules (components/monitoring) are in prod only: dev clusters need no Prometheus Operator.
    assert unschemed == {"Certificate", "Issuer", "Cluster"} | ({"PrometheusRule"} if overlay == "prod" else set())


# --- the validators can fail -----------------------------------------------------------------------
def test_strict_validation_refuses_an_unknown_field_in_a_builtin_kind(render_overlay) -> None:  # type: ignore[no-untyped-def]
    deployment = next(d for d in render_overlay("dev") if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {"grpc": {"port": 50052}}
    assert any("readinessProbes" in e for e in strict_errors(deployment))


@pytest.mark.parametrize(
    ("kind", "mutate", "expected"),
    [
        ("Certificate", lambda d: d["spec"].update(uri=d["spec"].pop("uris")), "uri"),
        ("Certificate", lambda d: d["spec"]["privateKey"].update(algorithm="DSA"), "DSA"),
        ("Certificate", lambda d: d["spec"].update(renewBefore="ten days"), "ten days"),
        ("Issuer", lambda d: d["spec"].update(acmee={}), "acmee"),
        (
            "Cluster",
            lambda d: d["spec"]["managed"]["roles"][0].update(passwordSecrets={"name": "x"}),
            "passwordSecrets",
        ),
        ("Cluster", lambda d: d["spec"].update(instances="three"), "three"),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(alert="Both"), "Both"),
        ("PrometheusRule", lambda d: d["spec"]["groups"][-1]["rules"][0].update(For="5m"), "For"),
        ("PrometheusRule", lambda d: d["spec"]["groups"][-1]["rules"][-1].update({"for": "ten minutes"}), "ten minutes"),
    ],
)
def test_crd_schemas_refuse_broken_custom_resources(render_overlay, kind, mutate, expected) -> None:  # type: ignore[no-untyped-def]
    doc = next(d for d in render_overlay("prod") if d["kind"] == kind)
    assert not strict_errors(doc)
    mutate(doc)
    errors = strict_errors(doc)
    assert errors and any(expected in e for e in errors), errors


def test_an_unknown_custom_kind_fails_instead_of_passing() -> None:
    doc = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}, "spec": {}}
    assert strict_errors(doc) and "no schema" in strict_errors(doc)[0]
