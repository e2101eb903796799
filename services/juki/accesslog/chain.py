"""The hash chain and signed checkpoints of the access log: pure functions, no I/O but key files.

chain_hash(n) = SHA-256(chain_hash(n-1) || SHA-256(canonical_bytes(record n))), chain_hash(0) = 32 zero
bytes. The canonical bytes of a stored record are::

    sequence (8 bytes, big-endian unsigned) || provided_at (8, signed, microseconds since the epoch)
    || recorded_at (8, same) || outcome (1) || len(subject) (1) || subject || payload

where ``payload`` is the ProvisionRecord with resident_code cleared, serialised deterministically, and
``subject`` the HMAC pseudonym of the resident code (empty when the record names none). Every stored
column except chain_hash is covered, so altering, deleting, inserting or reordering rows breaks it.

Checkpoints sign ``"juki-accesslog-checkpoint-v1\\n<sequence>\\n<hex chain hash>\\n<s>.<ns 9 digits>\\n"``
with the Ed25519 key certified by the mesh CA (``signing/accesslog``). A purge checkpoint uses the
prefix ``juki-accesslog-purge-v1``: it anchors the first remaining record after a retention purge, and
an ordinary checkpoint cannot stand in for it (else deleting a prefix up to any checkpoint would pass).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from juki.accesslog import notes
from juki.mesh.settings import spiffe_id

GENESIS = bytes(32)
CHECKPOINT_PREFIX = "juki-accesslog-checkpoint-v1"
PURGE_PREFIX = "juki-accesslog-purge-v1"
_HEADER = struct.Struct(">QqqBB")
_sha256 = hashlib.sha256


def pseudonym(key: bytes, resident_code: str) -> bytes:
    """The keyed pseudonym (HMAC-SHA256) stored instead of a 住民票コード; empty for no code."""
    if not resident_code:
        return b""
    return hmac.digest(key, resident_code.encode("ascii"), "sha256")


class Pseudonymiser:
    """HMAC-SHA256 with the key schedule done once (RFC 2104 inner/outer states copied per call).

    Same output as :func:`pseudonym`, at less than half the cost: the writer computes one per record.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def __call__(self, resident_code: str) -> bytes:
        if not resident_code:
            return b""
        inner = self._inner.copy()
        inner.update(resident_code.encode("ascii"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def canonical_bytes(
    sequence: int, provided_at_us: int, recorded_at_us: int, outcome: int, subject: bytes, payload: bytes
) -> bytes:
    return _HEADER.pack(sequence, provided_at_us, recorded_at_us, outcome, len(subject)) + subject + payload


def next_hash(previous: bytes, canonical: bytes) -> bytes:
    return _sha256(previous + _sha256(canonical).digest()).digest()


def checkpoint_payload(sequence: int, chain_hash: bytes, signed_at_ns: int, *, purge: bool = False) -> bytes:
    seconds, nanos = divmod(signed_at_ns, 1_000_000_000)
    prefix = PURGE_PREFIX if purge else CHECKPOINT_PREFIX
    return f"{prefix}\n{sequence}\n{chain_hash.hex()}\n{seconds}.{nanos:09d}\n".encode()


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """Hex SHA-256 fingerprint of the raw Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


SIGNING_IDENTITY = spiffe_id("signing", "accesslog")


def ca_certificate(cert_pem: bytes, ca_pem: bytes, what: str, *, at: dt.datetime | None = None
                   ) -> tuple[x509.Certificate, list[str]]:
    """A certificate shown to be issued by the mesh CA (and valid at ``at``, when given), with its URI SANs.
    ValueError naming ``what`` ("the signing certificate", "the witness certificate") otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise ValueError(f"{what} is not PEM") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ValueError(f"{what} is not issued by the mesh CA") from exc
    if at is not None and not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise ValueError(f"{what} is outside its validity")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = list(names.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = []
    return cert, uris


def signing_public_key(cert_pem: bytes, ca_pem: bytes, *, at: dt.datetime | None = None) -> ed25519.Ed25519PublicKey:
    """The checkpoint key from its certificate, once the certificate is shown to be the mesh CA's
    certificate for the access log's signing identity (any other Ed25519 certificate of the CA, e.g. a
    witness's, must not pass for the log's). ValueError naming what failed otherwise."""
    cert, uris = ca_certificate(cert_pem, ca_pem, "the signing certificate", at=at)
    if SIGNING_IDENTITY not in uris:
        raise ValueError(f"the signing certificate is not for {SIGNING_IDENTITY}")
    public_key = cert.public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise ValueError("the signing certificate does not hold an Ed25519 key")
    return public_key


class Signer:
    """The checkpoint signing key (Ed25519, PKCS#8 PEM as issued by the mesh PKI)."""

    def __init__(self, key_file: Path) -> None:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{key_file}: the access-log signing key must be Ed25519")
        self._key = key
        self.key_id = key_id(key.public_key())

    def note_signer(self, origin: str) -> notes.NoteSigner:
        """The same key signing tree checkpoints as C2SP signed notes, under the log's origin."""
        return notes.NoteSigner(origin, self._key)

    def sign(self, sequence: int, chain_hash: bytes, signed_at_ns: int, *, purge: bool = False) -> bytes:
        return self._key.sign(checkpoint_payload(sequence, chain_hash, signed_at_ns, purge=purge))


class CheckpointVerifier:
    """Checks checkpoint signatures against the signing certificate, itself checked against the CA."""

    def __init__(self, signing_cert_file: Path, ca_cert_file: Path) -> None:
        cert = x509.load_pem_x509_certificate(Path(signing_cert_file).read_bytes())
        self.ca_path = Path(ca_cert_file)
        self.ca_pem = self.ca_path.read_bytes()
        ca = x509.load_pem_x509_certificate(self.ca_pem)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ValueError(f"{signing_cert_file}: the signing certificate is not issued by the mesh CA") from exc
        public_key = cert.public_key()
        if not isinstance(public_key, ed25519.Ed25519PublicKey):
            raise ValueError(f"{signing_cert_file}: the signing certificate does not hold an Ed25519 key")
        self._public_key = public_key
        self.key_id = key_id(public_key)
        self.certificate_pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    def note_verifier(self, origin: str) -> notes.NoteVerifier:
        return notes.NoteVerifier(origin, self._public_key)

    def verify(
        self, sequence: int, chain_hash: bytes, signed_at_ns: int, signature: bytes, signer_key_id: str,
        *, purge: bool = False,
    ) -> bool:
        if signer_key_id != self.key_id:
            return False
        try:
            self._public_key.verify(signature, checkpoint_payload(sequence, chain_hash, signed_at_ns, purge=purge))
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class StoredCheckpoint:
    sequence: int
    chain_hash: bytes
    signed_at_ns: int
    signature: bytes
    key_id: str
    kind: str


@dataclass
class VerifyResult:
    """Outcome of recomputing the chain and checking the checkpoints."""

    ok: bool = True
    records_checked: int = 0
    last_hash: bytes = b""
    checkpoints_checked: int = 0
    first_bad_sequence: int = 0
    problem: str = ""
    latest_checkpoint: StoredCheckpoint | None = None
    first_sequence: int = 0
    last_sequence: int = 0
    tree: Any = None  # juki.accesslog.verify.TreeProgress: the Merkle tree side

    def fail(self, sequence: int, problem: str) -> None:
        if self.ok:
            self.ok = False
            self.first_bad_sequence = sequence
            self.problem = problem
