"""The access log as a transparency log over real PostgreSQL and mTLS: signed tree checkpoints (C2SP),
inclusion and consistency proofs, and the refusal of every malformed request with its field named."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki.accesslog import merkle, notes

from tests.integration.accesslog.conftest import LiveLog, codes, provision
from tests.integration.accesslog.test_accesslog import _bad_fields

pytestmark = pytest.mark.timeout(120)


def parse_note(note: str, cert_pem: str, ca: Any) -> tuple[str, int, bytes]:
    """An independent reading of the note: signed-note key id and Ed25519 signature by hand."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.ca_cert_path.read_bytes()))
    public = cert.public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey)
    body, signatures = note.split("\n\n")
    body += "\n"
    origin, size, root = body.splitlines()
    line = signatures.splitlines()[0]
    assert line.startswith("\u2014 " + origin + " ")
    blob = base64.b64decode(line.rsplit(" ", 1)[1])
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert blob[:4] == hashlib.sha256(origin.encode() + b"\n\x01" + raw).digest()[:4]
    public.verify(blob[4:], body.encode())
    return origin, int(size), base64.b64decode(root)


async def fill(live_log: LiveLog, count: int, seed: int = 1) -> None:
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(count, seed=seed)]))


async def test_checkpoint_is_a_signed_note_and_every_leaf_proves_into_it(
    live_log: LiveLog, ca: Any, database: Any
) -> None:
    await fill(live_log, 21)
    auditor = live_log.stub("operator", "demo-operator")
    first = await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    origin, size, root = parse_note(first.tree_checkpoint, first.signing_certificate, ca)
    assert (origin, size) == ("juki.local/accesslog", 21)
    reader = live_log.stub("service", "disclosure")
    listed = await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(
        resident_code=codes(21, seed=1)[4], proof_tree_size=size))
    assert len(listed.provisions) == 1
    logged = listed.provisions[0]
    assert logged.sequence == 5 and codes(21, seed=1)[4].encode() not in logged.leaf
    assert merkle.verify_inclusion(merkle.leaf_hash(logged.leaf), 4, size, list(logged.inclusion_proof), root)
    for index in range(size):
        proof = await auditor.GetInclusionProof(accesslog_pb2.GetInclusionProofRequest(leaf_index=index, tree_size=size))
        assert merkle.verify_inclusion(proof.leaf_hash, index, size, list(proof.inclusion_proof), root)

    await fill(live_log, 300, seed=2)
    second = await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest(since_checkpoint=first.tree_checkpoint))
    _, new_size, new_root = parse_note(second.tree_checkpoint, second.signing_certificate, ca)
    assert new_size == 321
    assert merkle.verify_consistency(size, new_size, root, new_root, list(second.consistency_proof))
    roots = await roots_from_records(database, live_log.schema)
    assert roots[size] == root and roots[new_size] == new_root
    for old in (1, 2, 7, 21, 256, 257, 320, 321):
        reply = await auditor.GetConsistencyProof(accesslog_pb2.GetConsistencyProofRequest(
            first_size=old, second_size=new_size))
        assert merkle.verify_consistency(old, new_size, roots[old], new_root, list(reply.consistency_proof))
    # Nothing newer: the same checkpoint comes back, with an empty proof.
    again = await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest(since_checkpoint=second.tree_checkpoint))
    assert again.tree_checkpoint == second.tree_checkpoint and not again.consistency_proof


async def roots_from_records(database: Any, schema: str) -> list[bytes]:
    """The root of every tree size, recomputed from the stored records (independent of the tiles served)."""
    from juki.accesslog import chain

    admin = await database.admin()
    try:
        rows = await admin.fetch(
            f'SELECT sequence, subject, (EXTRACT(EPOCH FROM provided_at) * 1000000)::bigint AS p,'
            f' (EXTRACT(EPOCH FROM recorded_at) * 1000000)::bigint AS r, outcome, payload'
            f' FROM "{schema}".records ORDER BY sequence')
    finally:
        await admin.close()
    frontier = merkle.Frontier()
    roots = [frontier.root()]
    for r in rows:
        frontier.append(merkle.leaf_hash(chain.canonical_bytes(
            r["sequence"], r["p"], r["r"], r["outcome"], bytes(r["subject"]), bytes(r["payload"]))))
        roots.append(frontier.root())
    return roots


@pytest.mark.parametrize(("rpc", "request_fields", "field"), [
    ("GetInclusionProof", {"leaf_index": 0, "tree_size": 0}, "tree_size"),
    ("GetInclusionProof", {"leaf_index": 5, "tree_size": 5}, "leaf_index"),
    ("GetInclusionProof", {"leaf_index": 0, "tree_size": 6}, "tree_size"),
    ("GetInclusionProof", {"leaf_index": 2**64 - 1, "tree_size": 3}, "leaf_index"),
    ("GetInclusionProof", {"leaf_index": 0, "tree_size": 2**64 - 1}, "tree_size"),
    ("GetConsistencyProof", {"first_size": 0, "second_size": 3}, "first_size"),
    ("GetConsistencyProof", {"first_size": 4, "second_size": 3}, "first_size"),
    ("GetConsistencyProof", {"first_size": 1, "second_size": 6}, "second_size"),
    ("GetConsistencyProof", {"first_size": 2**64 - 1, "second_size": 2**63}, "second_size"),
    ("GetCheckpoint", {"since_checkpoint": "not a note"}, "since_checkpoint"),
    ("GetCheckpoint", {"since_checkpoint": "juki.local/accesslog\n5\nAAAA\n\n\u2014 juki.local/accesslog AAAAAAAA\n"},
     "since_checkpoint"),
])
async def test_bad_sizes_and_checkpoints_are_invalid_arguments_naming_the_field(
    live_log: LiveLog, rpc: str, request_fields: dict[str, Any], field: str
) -> None:
    await fill(live_log, 5)
    stub = live_log.stub("service", "disclosure")
    request_class = getattr(accesslog_pb2, f"{rpc}Request")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, rpc)(request_class(**request_fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert _bad_fields(caught.value) == [field]


async def test_a_checkpoint_signed_by_another_key_or_newer_than_the_log_is_refused(live_log: LiveLog) -> None:
    await fill(live_log, 3)
    stub = live_log.stub("service", "disclosure")
    stranger = notes.NoteSigner("juki.local/accesslog", ed25519.Ed25519PrivateKey.generate())
    forged = stranger.sign(notes.Checkpoint("juki.local/accesslog", 3, bytes(32)).body())
    assert live_log.app.signer is not None
    ahead = live_log.app.signer.note_signer("juki.local/accesslog").sign(
        notes.Checkpoint("juki.local/accesslog", 99, bytes(32)).body())
    for note in (forged, ahead):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetCheckpoint(accesslog_pb2.GetCheckpointRequest(since_checkpoint=note))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _bad_fields(caught.value) == ["since_checkpoint"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListProvisions(accesslog_pb2.ListProvisionsRequest(resident_code=codes(1, seed=1)[0],
                                                                      proof_tree_size=4))
    assert _bad_fields(caught.value) == ["proof_tree_size"]


async def test_proofs_are_deny_by_default(live_log: LiveLog) -> None:
    await fill(live_log, 2)
    agency = live_log.stub("agency", "jps")
    for call in (agency.GetInclusionProof(accesslog_pb2.GetInclusionProofRequest(leaf_index=0, tree_size=1)),
                 agency.GetConsistencyProof(accesslog_pb2.GetConsistencyProofRequest(first_size=1, second_size=2)),
                 agency.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
