"""Structural schemas for the custom resources the manifests use.

kubernetes-validate ships schemas for built-in kinds only; for an unknown kind it reports "couldn't
find schema" and its CLI still exits 0. So the CRD kinds are checked here instead, against a
hand-written subset of the upstream CRDs (cert-manager.io/v1 Certificate and Issuer,
postgresql.cnpg.io/v1 Cluster, monitoring.coreos.com/v1 PrometheusRule): exactly the fields these manifests use, with their types and enums,
and ``additionalProperties: false`` so that a misspelt or invented field fails. It is narrower than
the real CRD (a valid upstream field we do not use is also refused): widen it when a manifest needs one.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def obj(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": required or [],
        "additionalProperties": False,
    }


STRING: Schema = {"type": "string", "minLength": 1}
BOOL: Schema = {"type": "boolean"}
DURATION: Schema = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"}
STRINGS: Schema = {"type": "array", "items": STRING, "minItems": 1}
LABELS: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA: Schema = {
    "type": "object",
    "properties": {"name": STRING, "namespace": STRING, "labels": LABELS, "annotations": LABELS},
    "required": ["name"],
    "additionalProperties": False,
}
RESOURCES: Schema = obj({"requests": LABELS, "limits": LABELS})


def resource(api_version: str, kind: str, spec: Schema) -> Schema:
    return obj(
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
        ["apiVersion", "kind", "metadata", "spec"],
    )


KEY_USAGES = [
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
]

CERTIFICATE = resource(
    "cert-manager.io/v1",
    "Certificate",
    obj(
        {
            "secretName": STRING,
            "secretTemplate": obj({"labels": LABELS, "annotations": LABELS}),
            "commonName": STRING,
            "subject": obj({"organizations": STRINGS, "organizationalUnits": STRINGS, "countries": STRINGS}),
            "dnsNames": STRINGS,
            "uris": {
                "type": "array",
                "items": {"type": "string", "pattern": "^spiffe://juki\\.local/"},
                "minItems": 1,
            },
            "isCA": BOOL,
            "duration": DURATION,
            "renewBefore": DURATION,
            "privateKey": obj(
                {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    "rotationPolicy": {"enum": ["Never", "Always"]},
                }
            ),
            "usages": {"type": "array", "items": {"enum": KEY_USAGES}},
            "issuerRef": obj(
                {"name": STRING, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": STRING}, ["name"]
            ),
        },
        ["secretName", "issuerRef"],
    ),
)

ISSUER = resource(
    "cert-manager.io/v1",
    "Issuer",
    {
        **obj({"selfSigned": obj({}), "ca": obj({"secretName": STRING}, ["secretName"])}),
        "minProperties": 1,
        "maxProperties": 1,
    },
)

ROLE = obj(
    {
        "name": STRING,
        "ensure": {"enum": ["present", "absent"]},
        "comment": {"type": "string"},
        "login": BOOL,
        "superuser": BOOL,
        "createdb": BOOL,
        "createrole": BOOL,
        "inherit": BOOL,
        "replication": BOOL,
        "bypassrls": BOOL,
        "connectionLimit": {"type": "integer", "minimum": -1},
        "passwordSecret": obj({"name": STRING}, ["name"]),
        "inRoles": STRINGS,
    },
    ["name"],
)

CLUSTER = resource(
    "postgresql.cnpg.io/v1",
    "Cluster",
    obj(
        {
            "description": {"type": "string"},
            "instances": {"type": "integer", "minimum": 1},
            "imageName": STRING,
            "enableSuperuserAccess": BOOL,
            "primaryUpdateStrategy": {"enum": ["unsupervised", "supervised"]},
            "minSyncReplicas": {"type": "integer", "minimum": 0},
            "maxSyncReplicas": {"type": "integer", "minimum": 0},
            "bootstrap": obj(
                {
                    "initdb": obj(
                        {"database": STRING, "owner": STRING, "secret": obj({"name": STRING}, ["name"])}
                    )
                }
            ),
            "managed": obj({"roles": {"type": "array", "items": ROLE}}),
            "postgresql": obj({"parameters": {"type": "object", "additionalProperties": {"type": "string"}}}),
            "storage": obj({"size": STRING, "storageClass": STRING}, ["size"]),
            "resources": RESOURCES,
            "affinity": obj(
                {
                    "enablePodAntiAffinity": BOOL,
                    "topologyKey": STRING,
                    "podAntiAffinityType": {"enum": ["preferred", "required"]},
                }
            ),
        },
        ["instances", "storage"],
    ),
)

# A rule records or alerts, never both; PromQL itself is checked by promtool (tests/k8s/test_alerts.py).
_RULE_COMMON: dict[str, Schema] = {"expr": STRING, "labels": LABELS}
PROMETHEUS_RULE = resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    obj(
        {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": obj(
                    {
                        "name": STRING,
                        "interval": DURATION,
                        "rules": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "oneOf": [
                                    obj({"record": STRING, **_RULE_COMMON}, ["record", "expr"]),
                                    obj(
                                        {"alert": STRING, "for": DURATION, "annotations": LABELS, **_RULE_COMMON},
                                        ["alert", "expr"],
                                    ),
                                ]
                            },
                        },
                    },
                    ["name", "rules"],
                ),
            }
        },
        ["groups"],
    ),
)

SCHEMAS: dict[tuple[str, str], Schema] = {
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("cert-manager.io/v1", "Issuer"): ISSUER,
    ("postgresql.cnpg.io/v1", "Cluster"): CLUSTER,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
