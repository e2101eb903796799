"""Operator proofs: a human operator's per-request signature (the operator IC card, 操作者識別カード).

The format is fixed in ``juki.common.v1.OperatorProof``: a signature over

    juki-operator-proof-v1
    <full gRPC method name>
    <hex SHA-256 of the request serialised deterministically with the proof field cleared>
    <seconds>.<nanos, 9 digits>
    <hex nonce>

(each line ended by ``\\n``) made with the key of an operator certificate issued by the mesh CA: ECDSA
P-256 with SHA-256, the signature DER-encoded, as the contract states (the operator's key is the key of its
mTLS certificate, and the CA issues those on P-256). A proof is refused when the certificate does not chain
to the mesh CA, is outside its validity or revoked, is not an ``operator`` identity, holds another kind of
key, when the signature does not verify,
the timestamp is more than :data:`MAX_SKEW_SECONDS` from the wall clock, or the nonce was seen before.
Nonces are remembered in the verifying service's own ``operator_nonces`` table
(``operator_id text, nonce bytea, seen_at timestamptz, PRIMARY KEY (operator_id, nonce)``).

The skew is measured against the wall clock, not the business clock: the business clock may stand on
a historical date while the signature is made now.

Passwords (the PIN of the operator card): when the service is given an operator password file
(``JUKI_OPERATOR_PASSWORDS_FILE``: JSON ``{"<operator_id>": "scrypt$<salt hex>$<hash hex>"}``, made
with :func:`hash_operator_password`), the proof's password must match the operator's entry and an
operator without one is refused. Without such a file no password is checked (the local demo mesh).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from juki._gen.juki.common.v1 import common_pb2
from juki.mesh.errors import JukiError, Reason, SettingsError, invalid
from juki.mesh.methods import PROOF_FIELD, require_method
from juki.mesh.pki import load_revoked_serials
from juki.mesh.settings import SPIFFE_TRUST_DOMAIN, TlsFiles
from juki.mesh.tls import require_peer

PROOF_CONTEXT = "juki-operator-proof-v1"
MAX_SKEW_SECONDS = 120.0
MIN_NONCE_BYTES = 16


def request_digest(request: Any, proof_field: str = PROOF_FIELD) -> str:
    """Hex SHA-256 of ``request`` serialised deterministically with its proof field cleared."""
    clone = type(request)()
    clone.CopyFrom(request)
    if proof_field in clone.DESCRIPTOR.fields_by_name:
        clone.ClearField(proof_field)
    return hashlib.sha256(clone.SerializeToString(deterministic=True)).hexdigest()


def proof_payload(method: str, request: Any, proof: common_pb2.OperatorProof, proof_field: str = PROOF_FIELD) -> bytes:
    """The canonical bytes an operator signs."""
    lines = (
        PROOF_CONTEXT,
        method,
        request_digest(request, proof_field),
        f"{proof.timestamp.seconds}.{proof.timestamp.nanos:09d}",
        proof.nonce.hex(),
    )
    return "".join(line + "\n" for line in lines).encode()


def _operator_name(certificate: x509.Certificate) -> str | None:
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    prefix = f"spiffe://{SPIFFE_TRUST_DOMAIN}/operator/"
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(prefix) and "/" not in uri[len(prefix):]:
            return uri[len(prefix):]
    return None


def sign_operator_proof(
    request: Any,
    method: str,
    *,
    cert_pem: bytes,
    key_pem: bytes,
    password: str = "",
    proof_field: str = PROOF_FIELD,
    now: float | None = None,
) -> common_pb2.OperatorProof:
    """Make a proof for ``request`` to ``method`` and set it on the request's proof field; return it.

    For clients and the CLI: ``cert_pem``/``key_pem`` are the operator certificate and its key.
    """
    certificate = x509.load_pem_x509_certificate(cert_pem)
    operator_id = _operator_name(certificate)
    if operator_id is None:
        raise ValueError("not an operator certificate (no spiffe://juki.local/operator/<name> SAN)")
    moment = time.time() if now is None else now
    seconds = int(moment)
    proof = common_pb2.OperatorProof(
        operator_id=operator_id, nonce=os.urandom(MIN_NONCE_BYTES), password=password, certificate_pem=cert_pem
    )
    proof.timestamp.seconds = seconds
    proof.timestamp.nanos = int((moment - seconds) * 1e9)
    payload = proof_payload(method, request, proof, proof_field)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)):
        raise ValueError("operator keys are ECDSA P-256")
    proof.signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    getattr(request, proof_field).CopyFrom(proof)
    return proof


def sign_with_files(request: Any, method: str, cert: Path, key: Path, password: str = "") -> common_pb2.OperatorProof:
    """:func:`sign_operator_proof` with the certificate and key read from files."""
    return sign_operator_proof(request, method, cert_pem=cert.read_bytes(), key_pem=key.read_bytes(), password=password)


@dataclass(frozen=True)
class VerifiedOperator:
    """The operator a proof was verified for."""

    operator_id: str
    spiffe_id: str
    serial: int


_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


def hash_operator_password(password: str, salt: bytes | None = None) -> str:
    """The stored form of an operator password: ``scrypt$<salt hex>$<hash hex>``."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def _password_matches(password: str, stored: str) -> bool:
    scheme, _, rest = stored.partition("$")
    salt_hex, _, digest_hex = rest.partition("$")
    if scheme != "scrypt" or not salt_hex or not digest_hex:
        return False
    return hmac.compare_digest(hash_operator_password(password, bytes.fromhex(salt_hex)), stored)


def load_passwords(path: str | Path | None) -> dict[str, str] | None:
    """The operator password file, or ``None`` when none is configured."""
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"operator password file {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise SettingsError(f"{path}: expected a JSON object of operator_id -> scrypt$salt$hash")
    return {str(k): str(v) for k, v in data.items()}


def _refuse(description: str, field: str = PROOF_FIELD) -> JukiError:
    return invalid(field, description, Reason.OPERATOR_PROOF_INVALID)


class OperatorVerifier:
    """Verifies operator proofs for one service; remembers nonces in that service's database."""

    def __init__(self, tls: TlsFiles, pool: asyncpg.Pool, *, max_skew_seconds: float = MAX_SKEW_SECONDS,
                 passwords: dict[str, str] | None = None) -> None:
        self._passwords = passwords
        self._ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
        self._tls = tls
        self._pool = pool
        self._max_skew = max_skew_seconds
        self._revoked: frozenset[int] = frozenset()
        self._crl_mtime = -1.0

    def _revoked_serials(self) -> frozenset[int]:
        crl = self._tls.crl
        if crl is None:
            return frozenset()
        try:
            mtime = crl.stat().st_mtime
        except OSError:
            return self._revoked
        if mtime != self._crl_mtime:
            self._revoked = load_revoked_serials(crl, self._tls.ca)
            self._crl_mtime = mtime
        return self._revoked

    async def check(self, request: Any) -> VerifiedOperator | None:
        """The one operator-proof check of every service, by the method table's rule for the current call.

        ``None`` when the call needs no proof and carries none (a service acting on its certificate);
        otherwise the verified operator, or ``OPERATOR_PROOF_INVALID``/``_REPLAYED`` naming the field.
        The proof is verified against the path the call arrived on (``mesh.methods.current_method``).
        """
        method = require_method()
        field = method.spec.proof_field
        if not method.proof_checked(request.HasField(field), require_peer().kind):
            return None
        return await self.verify(method.path, request, field)

    async def verify(self, method: str, request: Any, proof_field: str = PROOF_FIELD) -> VerifiedOperator:
        """Check the proof carried in ``request``; raise ``OPERATOR_PROOF_INVALID``/``_REPLAYED`` if bad."""
        if not request.HasField(proof_field):
            raise _refuse("an operator proof is required for this request", proof_field)
        proof: common_pb2.OperatorProof = getattr(request, proof_field)
        try:
            certificate = x509.load_pem_x509_certificate(proof.certificate_pem)
        except ValueError:
            raise _refuse("certificate_pem is not a PEM certificate", f"{proof_field}.certificate_pem") from None
        try:
            certificate.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise _refuse("the operator certificate is not issued by the mesh CA",
                          f"{proof_field}.certificate_pem") from None
        now = dt.datetime.now(dt.UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise _refuse("the operator certificate is outside its validity", f"{proof_field}.certificate_pem")
        if certificate.serial_number in self._revoked_serials():
            raise _refuse("the operator certificate is revoked", f"{proof_field}.certificate_pem")
        name = _operator_name(certificate)
        if name is None:
            raise _refuse("the certificate is not an operator certificate", f"{proof_field}.certificate_pem")
        if proof.operator_id != name:
            raise _refuse(f"operator_id {proof.operator_id!r} does not match the certificate ({name})",
                          f"{proof_field}.operator_id")
        if len(proof.nonce) < MIN_NONCE_BYTES:
            raise _refuse(f"the nonce must be at least {MIN_NONCE_BYTES} bytes", f"{proof_field}.nonce")
        stamp = proof.timestamp.seconds + proof.timestamp.nanos / 1e9
        if abs(time.time() - stamp) > self._max_skew:
            raise _refuse(f"the timestamp is more than {self._max_skew:.0f} s from the server clock",
                          f"{proof_field}.timestamp")
        public_key = certificate.public_key()
        if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
            raise _refuse("the operator certificate's key is not ECDSA P-256", f"{proof_field}.certificate_pem")
        payload = proof_payload(method, request, proof, proof_field)
        try:
            public_key.verify(proof.signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise _refuse("the signature does not verify", f"{proof_field}.signature") from None
        if self._passwords is not None:
            stored = self._passwords.get(proof.operator_id)
            if stored is None or not await asyncio.to_thread(_password_matches, proof.password, stored):
                raise _refuse("the operator password does not match", f"{proof_field}.password")
        async with self._pool.acquire() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO operator_nonces (operator_id, nonce) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true",
                proof.operator_id, proof.nonce,
            )
            if not inserted:
                raise JukiError(Reason.OPERATOR_PROOF_REPLAYED, "this operator proof was used before")
            # Proofs older than the skew are refused anyway, so their nonces need not be kept.
            await conn.execute(
                "DELETE FROM operator_nonces WHERE seen_at < now() - make_interval(secs => $1)",
                self._max_skew * 2,
            )
        return VerifiedOperator(proof.operator_id, f"spiffe://{SPIFFE_TRUST_DOMAIN}/operator/{name}",
                                certificate.serial_number)
