"""Cosignatures (C2SP tlog-cosignature, cosignature/v1) and the witness's split-view checks, without I/O."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from juki.accesslog import merkle, notes, witness

ORIGIN = "juki.local/accesslog"
LOG_KEY = ed25519.Ed25519PrivateKey.generate()
LEAVES = [merkle.leaf_hash(bytes([i])) for i in range(20)]


def node(level: int, index: int) -> bytes:
    hashes = LEAVES[index << level:(index + 1) << level]
    while len(hashes) > 1:
        hashes = [merkle.node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


def checkpoint(size: int) -> notes.Checkpoint:
    return notes.Checkpoint(ORIGIN, size, merkle.root(size, node))


def signed(size: int) -> str:
    return notes.NoteSigner(ORIGIN, LOG_KEY).sign(checkpoint(size).body())


def test_a_cosignature_line_is_the_c2sp_format_checked_by_hand() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = witness.key_name("w1")
    note = notes.Cosigner(name, key).cosign(signed(7), 1_700_000_000)
    line = note.splitlines()[-1]
    assert line.startswith(f"\u2014 {name} ")
    blob = base64.b64decode(line.rsplit(" ", 1)[1])
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert blob[:4] == hashlib.sha256(name.encode() + b"\n\x04" + raw).digest()[:4]
    assert struct.unpack(">Q", blob[4:12])[0] == 1_700_000_000
    key.public_key().verify(blob[12:], b"cosignature/v1\ntime 1700000000\n" + checkpoint(7).body().encode())
    assert notes.CosignatureVerifier(name, key.public_key()).verify(note) == 1_700_000_000
    # The log's signature still verifies with the witness line added.
    assert notes.NoteVerifier(ORIGIN, LOG_KEY.public_key()).verify_checkpoint(note).tree_size == 7


def test_a_cosignature_by_another_key_or_over_another_body_fails() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = witness.key_name("w1")
    verifier = notes.CosignatureVerifier(name, key.public_key())
    with pytest.raises(notes.NoteError, match="other than the certified one"):
        verifier.verify(notes.Cosigner(name, ed25519.Ed25519PrivateKey.generate()).cosign(signed(7), 1))
    with pytest.raises(notes.NoteError, match="no cosignature"):
        verifier.verify(signed(7))
    moved = notes.Cosigner(name, key).cosign(signed(7), 5).replace("\n7\n", "\n8\n", 1)
    with pytest.raises(notes.NoteError, match="does not verify"):
        verifier.verify(moved)
    # A plain note signature (type 0x01) under the witness's name is not a cosignature.
    with pytest.raises(notes.NoteError):
        verifier.verify(signed(7) + notes.NoteSigner(name, key).signature_line(checkpoint(7).body()))


def state(size: int) -> witness.WitnessState:
    cp = checkpoint(size)
    return witness.WitnessState(ORIGIN, size, cp.root_hash, signed(size))


def test_the_witness_accepts_extensions_and_names_both_roots_of_a_split_view() -> None:
    witness.check_extension(None, checkpoint(5), [])
    witness.check_extension(state(5), checkpoint(5), [])
    witness.check_extension(state(5), checkpoint(13), merkle.consistency_proof(5, 13, node))
    other = notes.Checkpoint(ORIGIN, 5, bytes(32))
    with pytest.raises(witness.SplitView, match="two roots for tree size 5") as caught:
        witness.check_extension(state(5), other, [])
    assert witness.root_text(checkpoint(5).root_hash) in str(caught.value)
    assert witness.root_text(bytes(32)) in str(caught.value)
    forked = notes.Checkpoint(ORIGIN, 13, bytes(32))
    with pytest.raises(witness.SplitView, match="not consistent"):
        witness.check_extension(state(5), forked, merkle.consistency_proof(5, 13, node))
    with pytest.raises(witness.SplitView, match="shrank"):
        witness.check_extension(state(13), checkpoint(5), [])
    with pytest.raises(witness.SplitView, match="origin"):
        witness.check_extension(state(5), notes.Checkpoint("elsewhere/log", 13, checkpoint(13).root_hash), [])
