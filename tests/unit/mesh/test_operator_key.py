"""Operator proofs: the contract (common.proto), the CA and the code name the same algorithm, ECDSA P-256."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from juki._gen.juki.card.v1 import card_pb2
from juki.mesh import pki
from juki.mesh.errors import JukiError, Reason
from juki.mesh.operator import OperatorVerifier, proof_payload, sign_operator_proof
from juki.mesh.settings import TlsFiles

PROTO = Path(__file__).resolve().parents[3] / "proto" / "juki" / "common" / "v1" / "common.proto"
METHOD = "/juki.card.v1.CardService/IssueCard"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> pki.CertificateAuthority:
    authority = pki.CertificateAuthority(tmp_path_factory.mktemp("pki"))
    authority.create()
    return authority


def _operator_proof_comments() -> str:
    text = PROTO.read_text()
    start = text.index("// Per-request proof that a human operator")
    return text[start:text.index("}", text.index("message OperatorProof", start))]


def test_the_contract_names_ecdsa_p256_and_not_ed25519() -> None:
    contract = _operator_proof_comments()
    assert "ECDSA P-256" in contract and "SHA-256" in contract
    assert not re.search("ed25519", contract, re.IGNORECASE)


def test_the_ca_issues_operator_keys_on_p256(ca: pki.CertificateAuthority) -> None:
    issued = ca.issue("operator", "key-check")
    key = serialization.load_pem_private_key(issued.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)


def test_a_proof_is_an_ecdsa_p256_sha256_signature_over_the_payload(ca: pki.CertificateAuthority) -> None:
    issued = ca.issue("operator", "signer")
    request = card_pb2.IssueCardRequest(resident_code="24727059608")
    proof = sign_operator_proof(request, METHOD, cert_pem=issued.cert.read_bytes(), key_pem=issued.key.read_bytes(),
                                proof_field="operator_proof")
    public_key = x509.load_pem_x509_certificate(issued.cert.read_bytes()).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(proof.signature, proof_payload(METHOD, request, proof, "operator_proof"),
                      ec.ECDSA(hashes.SHA256()))  # raises if the algorithm were another
    with pytest.raises(InvalidSignature):
        public_key.verify(proof.signature, b"another payload", ec.ECDSA(hashes.SHA256()))


def _ed25519_operator(ca: pki.CertificateAuthority, name: str) -> tuple[bytes, bytes]:
    """An operator certificate on an Ed25519 key, signed with the CA's own key (the CA never issues one)."""
    ca_cert = x509.load_pem_x509_certificate(ca.ca_cert_path.read_bytes())
    ca_key: Any = serialization.load_pem_private_key(ca.ca_key_path.read_bytes(), password=None)
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(pki.spiffe_id("operator", name))]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_an_ed25519_key_signs_no_proof(ca: pki.CertificateAuthority) -> None:
    cert_pem, key_pem = _ed25519_operator(ca, "ed-signer")
    with pytest.raises(ValueError, match="ECDSA P-256"):
        sign_operator_proof(card_pb2.IssueCardRequest(), METHOD, cert_pem=cert_pem, key_pem=key_pem,
                            proof_field="operator_proof")


async def test_a_proof_from_an_ed25519_certificate_is_refused(ca: pki.CertificateAuthority) -> None:
    cert_pem, key_pem = _ed25519_operator(ca, "ed-holder")
    request = card_pb2.IssueCardRequest(resident_code="24727059608")
    # Made by hand, as a client following the old contract text would: Ed25519 over the same payload.
    proof = request.operator_proof
    proof.operator_id, proof.nonce, proof.certificate_pem = "ed-holder", b"n" * 16, cert_pem
    proof.timestamp.GetCurrentTime()
    private: Any = serialization.load_pem_private_key(key_pem, password=None)
    proof.signature = private.sign(proof_payload(METHOD, request, proof, "operator_proof"))
    tls = TlsFiles(ca=ca.ca_cert_path, cert=ca.ca_cert_path, key=ca.ca_key_path)
    verifier = OperatorVerifier(tls, pool=None)  # type: ignore[arg-type]  # refused before any nonce is stored
    with pytest.raises(JukiError) as refused:
        await verifier.verify(METHOD, request, "operator_proof")
    assert refused.value.reason == Reason.OPERATOR_PROOF_INVALID
    assert "P-256" in str(refused.value)
