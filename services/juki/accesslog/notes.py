"""Signed checkpoints of the Merkle tree: C2SP tlog-checkpoint bodies in C2SP signed-note envelopes.

A checkpoint body is three lines, each ending in a newline::

    <origin>
    <tree size, decimal>
    <root hash, standard base64>

A signed note is the body, a blank line and one signature line per signer,
``— <key name> <base64(key id (4 bytes) || Ed25519 signature over the body)>``, where the key id of an
Ed25519 key is the first four bytes of SHA-256(key name || 0x0A || 0x01 || 32-byte public key). The
access log signs with the key name equal to its origin; witnesses add their own lines (cosignatures).
Pure functions: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from juki.accesslog import merkle

SIGNATURE_PREFIX = "\u2014 "  # em dash and a space
ED25519_TYPE = b"\x01"
MAX_NOTE_BYTES = 16_384
_ORIGIN = re.compile(r"[\x21-\x7e]+")  # printable, no spaces: C2SP origins are schema-less URLs
_KEY_NAME = re.compile(r"[^\s+]+")


class NoteError(ValueError):
    """A note or checkpoint that does not parse or whose signature does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    tree_size: int
    root_hash: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.tree_size}\n{base64.b64encode(self.root_hash).decode()}\n"


def key_id(name: str, public_key: ed25519.Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + ED25519_TYPE + raw).digest()[:4]


def vkey(name: str, public_key: ed25519.Ed25519PublicKey) -> str:
    """The verifier key string of signed-note (``name+hex key id+base64(type || key)``), for configuration."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{name}+{key_id(name, public_key).hex()}+{base64.b64encode(ED25519_TYPE + raw).decode()}"


def parse_checkpoint(body: str) -> Checkpoint:
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("a checkpoint body has origin, size and root lines, each ending in a newline")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if not _ORIGIN.fullmatch(origin):
        raise NoteError("the checkpoint origin is empty or holds spaces or control characters")
    if not size_text.isascii() or not size_text.isdigit() or (len(size_text) > 1 and size_text[0] == "0") \
            or len(size_text) > 20 or int(size_text) >= 1 << 63:
        raise NoteError("the checkpoint tree size is not a decimal number without leading zeros")
    try:
        root_hash = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NoteError("the checkpoint root hash is not base64") from exc
    if len(root_hash) != merkle.HASH_SIZE:
        raise NoteError("the checkpoint root hash is not 32 bytes")
    return Checkpoint(origin, int(size_text), root_hash)


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """(body, [(key name, key id || signature)]) of a signed note, checking only its shape."""
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise NoteError("the note is too long")
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteError("the note holds control characters")
    cut = note.rfind("\n\n")
    if cut < 0 or not note.endswith("\n"):
        raise NoteError("a signed note is a body, a blank line and signature lines")
    body, signature_text = note[:cut + 1], note[cut + 2:]
    signatures: list[tuple[str, bytes]] = []
    for line in signature_text[:-1].split("\n"):
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError("a signature line starts with an em dash and a space")
        parts = line[len(SIGNATURE_PREFIX):].split(" ")
        if len(parts) != 2 or not _KEY_NAME.fullmatch(parts[0]):
            raise NoteError("a signature line is '— <key name> <base64 signature>'")
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise NoteError("a note signature is not base64") from exc
        if len(blob) < 5:
            raise NoteError("a note signature is too short")
        signatures.append((parts[0], blob))
    return body, signatures


class NoteSigner:
    """Signs note bodies with one Ed25519 key under one key name."""

    def __init__(self, name: str, private_key: ed25519.Ed25519PrivateKey) -> None:
        if not _KEY_NAME.fullmatch(name):
            raise ValueError(f"{name!r} cannot be a note key name (no spaces or '+')")
        self.name = name
        self._key = private_key
        self.key_id = key_id(name, private_key.public_key())

    def signature_line(self, body: str) -> str:
        blob = self.key_id + self._key.sign(body.encode())
        return f"{SIGNATURE_PREFIX}{self.name} {base64.b64encode(blob).decode()}\n"

    def sign(self, body: str) -> str:
        return body + "\n" + self.signature_line(body)

    def cosign(self, note: str) -> str:
        """Add this key's signature line to a signed note (a witness cosignature)."""
        body, _ = split_note(note)
        return note + self.signature_line(body)


class NoteVerifier:
    """Checks a note's signature by one named Ed25519 key; other signers' lines are ignored."""

    def __init__(self, name: str, public_key: ed25519.Ed25519PublicKey) -> None:
        if not _KEY_NAME.fullmatch(name):
            raise ValueError(f"{name!r} cannot be a note key name (no spaces or '+')")
        self.name = name
        self._key = public_key
        self.key_id = key_id(name, public_key)

    def verify(self, note: str) -> str:
        """The body of a note this key signed; NoteError otherwise."""
        body, signatures = split_note(note)
        for name, blob in signatures:
            if name == self.name and blob[:4] == self.key_id:
                try:
                    self._key.verify(blob[4:], body.encode())
                except InvalidSignature as exc:
                    raise NoteError(f"the signature of {name} does not verify") from exc
                return body
        raise NoteError(f"the note carries no signature of {self.name}")

    def verify_checkpoint(self, note: str) -> Checkpoint:
        checkpoint = parse_checkpoint(self.verify(note))
        if checkpoint.origin != self.name:
            raise NoteError(f"the checkpoint is of origin {checkpoint.origin}, not {self.name}")
        return checkpoint


# C2SP tlog-cosignature (cosignature/v1): a witness's signature line on a checkpoint. Its key id uses
# signature type 0x04 and its blob is key id (4) || timestamp (8, big-endian seconds) || Ed25519 signature
# over "cosignature/v1\ntime <timestamp>\n" followed by the checkpoint body.
COSIGNATURE_TYPE = b"\x04"
_TIMESTAMP = struct.Struct(">Q")


def cosignature_key_id(name: str, public_key: ed25519.Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + COSIGNATURE_TYPE + raw).digest()[:4]


def cosigned_message(body: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + body.encode()


class Cosigner:
    """A witness's Ed25519 key signing cosignature/v1 lines under its key name."""

    def __init__(self, name: str, private_key: ed25519.Ed25519PrivateKey) -> None:
        if not _KEY_NAME.fullmatch(name):
            raise ValueError(f"{name!r} cannot be a note key name (no spaces or '+')")
        self.name = name
        self._key = private_key
        self.key_id = cosignature_key_id(name, private_key.public_key())

    def cosignature_line(self, body: str, timestamp: int) -> str:
        if not 0 <= timestamp < 1 << 63:
            raise ValueError("a cosignature timestamp is a POSIX time below 2**63")
        blob = self.key_id + _TIMESTAMP.pack(timestamp) + self._key.sign(cosigned_message(body, timestamp))
        return f"{SIGNATURE_PREFIX}{self.name} {base64.b64encode(blob).decode()}\n"

    def cosign(self, note: str, timestamp: int) -> str:
        """The signed note with this witness's cosignature line added."""
        body, _ = split_note(note)
        return note + self.cosignature_line(body, timestamp)


class CosignatureVerifier:
    """Checks the cosignature/v1 line of one named witness key on a note."""

    def __init__(self, name: str, public_key: ed25519.Ed25519PublicKey) -> None:
        if not _KEY_NAME.fullmatch(name):
            raise ValueError(f"{name!r} cannot be a note key name (no spaces or '+')")
        self.name = name
        self._key = public_key
        self.key_id = cosignature_key_id(name, public_key)

    def verify(self, note: str) -> int:
        """The timestamp of this witness's cosignature on the note; NoteError when it has none that verifies."""
        body, signatures = split_note(note)
        found = False
        for name, blob in signatures:
            if name != self.name:
                continue
            found = True
            if blob[:4] != self.key_id:
                continue
            if len(blob) != 4 + 8 + 64:
                raise NoteError(f"the cosignature of {name} is not key id, timestamp and Ed25519 signature")
            (timestamp,) = _TIMESTAMP.unpack_from(blob, 4)
            if timestamp >= 1 << 63:
                raise NoteError(f"the cosignature of {name} has a timestamp beyond 2**63 - 1")
            try:
                self._key.verify(blob[12:], cosigned_message(body, timestamp))
            except InvalidSignature as exc:
                raise NoteError(f"the cosignature of {name} does not verify") from exc
            return int(timestamp)
        if found:
            raise NoteError(f"the cosignature of {self.name} is by a key other than the certified one"
                            f" (key id {self.key_id.hex()})")
        raise NoteError(f"the note carries no cosignature of {self.name}")


def signer_names(note: str) -> list[str]:
    """The key names of a note's signature lines, in order."""
    return [name for name, _ in split_note(note)[1]]
