"""Signed notes and checkpoints (C2SP signed-note, tlog-checkpoint): format, key id, refusals."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from juki.accesslog import notes

SEED = bytes(range(32))


def test_a_signed_checkpoint_has_the_c2sp_shape_and_key_id() -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(SEED)
    signer = notes.NoteSigner("example.com/log", key)
    note = signer.sign(notes.Checkpoint("example.com/log", 7, bytes(range(32))).body())
    body, signature = note.split("\n\n")
    assert body == "example.com/log\n7\n" + base64.b64encode(bytes(range(32))).decode()
    assert signature.startswith("\u2014 example.com/log ") and signature.endswith("\n")
    blob = base64.b64decode(signature.split(" ")[2])
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert blob[:4] == hashlib.sha256(b"example.com/log\n\x01" + raw).digest()[:4]
    key.public_key().verify(blob[4:], (body + "\n").encode())
    verifier = notes.NoteVerifier("example.com/log", key.public_key())
    assert verifier.verify_checkpoint(note) == notes.Checkpoint("example.com/log", 7, bytes(range(32)))
    assert notes.vkey("example.com/log", key.public_key()).startswith(f"example.com/log+{blob[:4].hex()}+")
    # A witness adds its own line; the log's signature still verifies.
    witness = notes.NoteSigner("witness.example", ed25519.Ed25519PrivateKey.generate())
    assert verifier.verify_checkpoint(witness.cosign(note)).tree_size == 7


@pytest.mark.parametrize("mutate", [
    lambda n: n.replace("\n7\n", "\n8\n"),
    lambda n: n.replace("example.com/log\n", "example.org/log\n", 1),
    lambda n: n.replace("\n\n", "\n"),
    lambda n: n + "extra",
    lambda n: n.replace("\u2014", "-"),
    lambda n: "",
    lambda n: n.replace("\n7\n", "\n07\n"),
    lambda n: n.replace("\n7\n", "\n-7\n"),
    lambda n: n.replace("\n7\n", "\n99999999999999999999999\n"),
    lambda n: n.replace("\n7\n", "\n7\x00\n"),
])
def test_altered_or_malformed_notes_are_refused(mutate: object) -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(SEED)
    note = notes.NoteSigner("example.com/log", key).sign(notes.Checkpoint("example.com/log", 7, bytes(32)).body())
    verifier = notes.NoteVerifier("example.com/log", key.public_key())
    with pytest.raises(notes.NoteError):
        verifier.verify_checkpoint(mutate(note))  # type: ignore[operator]


def test_another_key_under_the_same_name_is_refused() -> None:
    note = notes.NoteSigner("example.com/log", ed25519.Ed25519PrivateKey.generate()).sign(
        notes.Checkpoint("example.com/log", 1, bytes(32)).body())
    verifier = notes.NoteVerifier("example.com/log", ed25519.Ed25519PrivateKey.from_private_bytes(SEED).public_key())
    with pytest.raises(notes.NoteError):
        verifier.verify(note)
