"""The private CA of the mesh: one root, leaf certificates with SPIFFE URI SANs, and a CRL.

Layout of a PKI folder::

    ca.crt  ca.key  crl.pem  revoked.json
    <kind>/<name>.crt  <kind>/<name>.key      kind: service, prefecture, municipality, agency,
                                              operator, private, signing, witness
    witness/<name>.cosign.crt  witness/<name>.cosign.key

Keys are written owner-only (0600) before any byte of them is. TLS keys are ECDSA P-256; signing
keys (the access log's checkpoints) are Ed25519, certified by the same CA. A witness of the access
log gets both: a TLS identity to fetch checkpoints and submit cosignatures, and an Ed25519 cosigning
key certified for the same SPIFFE id (``spiffe://juki.local/witness/<name>``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from juki.mesh.settings import spiffe_id

KINDS = ("service", "prefecture", "municipality", "agency", "operator", "private", "signing", "witness")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9\-]{0,62}$")


class PkiError(Exception):
    """A PKI request that cannot be carried out (bad kind or name, missing CA)."""


@dataclass(frozen=True)
class Issued:
    kind: str
    name: str
    spiffe_id: str
    cert: Path
    key: Path
    serial: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


class CertificateAuthority:
    """A folder-backed private CA."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.root / "crl.pem"

    def exists(self) -> bool:
        return self.ca_cert_path.is_file() and self.ca_key_path.is_file()

    def create(self, *, common_name: str = "Juki-net mesh private CA", days: int = 3650) -> None:
        """Create the CA if it does not exist yet (never overwrites one)."""
        if self.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Juki-net mesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(
            self.ca_key_path,
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
        )
        _write_public(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._write_crl([])

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise PkiError(f"no CA in {self.root}: run `juki pki init` first")
        cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError("the CA key is not an EC key")
        return cert, key

    def paths(self, kind: str, name: str) -> tuple[Path, Path]:
        return self.root / kind / f"{name}.crt", self.root / kind / f"{name}.key"

    def cosigning_paths(self, name: str) -> tuple[Path, Path]:
        """The Ed25519 cosigning certificate and key of witness ``name``."""
        return self.root / "witness" / f"{name}.cosign.crt", self.root / "witness" / f"{name}.cosign.key"

    def issue(
        self,
        kind: str,
        name: str,
        *,
        days: int = 397,
        dns_names: tuple[str, ...] = ("localhost",),
        ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
        display_name: str | None = None,
        overwrite: bool = False,
        not_before: dt.datetime | None = None,
    ) -> Issued:
        """Issue (or return the existing) certificate for ``spiffe://juki.local/<kind>/<name>``."""
        if kind not in KINDS:
            raise PkiError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
        if not _NAME_RE.match(name):
            raise PkiError(f"bad name {name!r}: lower-case letters, digits and '-' only")
        cert_path, key_path = self.paths(kind, name)
        identity = spiffe_id(kind, name)
        if kind == "witness":
            self._issue_cosigning(name, identity, days=days, overwrite=overwrite, not_before=not_before)
        if cert_path.is_file() and key_path.is_file() and not overwrite:
            existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return Issued(kind, name, identity, cert_path, key_path, existing.serial_number)
        ca_cert, ca_key = self._load_ca()
        key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        key = ed25519.Ed25519PrivateKey.generate() if kind == "signing" else ec.generate_private_key(ec.SECP256R1())
        start = not_before or (_now() - dt.timedelta(minutes=5))
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)]
        if kind in ("service", "prefecture", "municipality"):
            sans += [x509.DNSName(d) for d in dns_names]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Juki-net mesh"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                x509.NameAttribute(NameOID.COMMON_NAME, display_name or name),
            ]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if kind != "signing":
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_private(
            key_path,
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
        )
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return Issued(kind, name, identity, cert_path, key_path, cert.serial_number)

    def _issue_cosigning(
        self, name: str, identity: str, *, days: int, overwrite: bool, not_before: dt.datetime | None
    ) -> None:
        cert_path, key_path = self.cosigning_paths(name)
        if cert_path.is_file() and key_path.is_file() and not overwrite:
            return
        ca_cert, ca_key = self._load_ca()
        key = ed25519.Ed25519PrivateKey.generate()
        start = not_before or (_now() - dt.timedelta(minutes=5))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Juki-net mesh"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "witness cosigning"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))

    # -- revocation ---------------------------------------------------------------------------

    def _revoked_path(self) -> Path:
        return self.root / "revoked.json"

    def revoked_serials(self) -> list[int]:
        path = self._revoked_path()
        if not path.is_file():
            return []
        return [int(s) for s in json.loads(path.read_text())]

    def revoke(self, kind: str, name: str) -> int:
        """Revoke a certificate: add its serial to the CRL that every service checks."""
        cert_path, _ = self.paths(kind, name)
        if not cert_path.is_file():
            raise PkiError(f"no certificate {kind}/{name}")
        serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
        revoked = {serial}
        cosign_cert, _ = self.cosigning_paths(name)
        if kind == "witness" and cosign_cert.is_file():  # a witness's cosigning key goes with its identity
            revoked.add(x509.load_pem_x509_certificate(cosign_cert.read_bytes()).serial_number)
        serials = sorted(set(self.revoked_serials()) | revoked)
        _write_public(self._revoked_path(), json.dumps([str(s) for s in serials]).encode())
        self._write_crl(serials)
        return serial

    def _write_crl(self, serials: list[int]) -> None:
        ca_cert, ca_key = self._load_ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=7))
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def load_revoked_serials(crl_path: Path | None, ca_cert_path: Path) -> frozenset[int]:
    """Serials revoked by a CRL whose signature checks against the CA (empty without a CRL)."""
    if crl_path is None or not crl_path.is_file():
        return frozenset()
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = ca.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):  # the CA's key is EC
        raise PkiError(f"CRL {crl_path} is not signed by the CA")
    return frozenset(r.serial_number for r in crl)


# The identities a local mesh needs: (kind, name, human-readable name).
def mesh_identities(prefectures: list[str], municipalities: list[str]) -> list[tuple[str, str, str]]:
    names: list[tuple[str, str, str]] = [
        ("service", "intake-national", "全国センター 本人確認情報 intake"),
        ("service", "lookup", "本人確認情報 lookup"),
        ("service", "accesslog", "提供記録 access log"),
        ("service", "disclosure", "開示 disclosure"),
        ("service", "card", "住基カード card service"),
        ("signing", "accesslog", "access-log checkpoint signing key"),
        ("agency", "jps", "日本年金機構"),
        ("operator", "demo-operator", "demo counter operator"),
        ("private", "acme-insurance", "a private-sector company (never granted)"),
    ]
    names += [("prefecture", p, f"prefecture {p}") for p in prefectures]
    names += [("municipality", m, f"municipality {m}") for m in municipalities]
    return names
