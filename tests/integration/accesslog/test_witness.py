"""Witnesses of the access log over real PostgreSQL and mTLS: `juki audit witness` cosigns checkpoints
(C2SP tlog-cosignature) that extend the one it cosigned before, the log stores and serves them, keys the
mesh CA did not certify are refused, and a split view (two roots for one size, or a new tree that does not
extend the old one, made here by tampering with the stored tiles and checkpoints) is reported, not cosigned."""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki.accesslog import merkle, notes, witness
from juki.mesh.pki import CertificateAuthority

from tests.integration.accesslog.conftest import LiveLog, codes
from tests.integration.accesslog.test_accesslog import _bad_fields
from tests.integration.accesslog.test_transparency import fill

pytestmark = pytest.mark.timeout(120)
ORIGIN = "juki.local/accesslog"


def witness_args(live_log: LiveLog, tmp_path: Path, name: str = "w1") -> argparse.Namespace:
    return argparse.Namespace(
        data_dir=tmp_path, name=name, address=live_log.address, ca=None, pki=live_log.ca.root,
        state=tmp_path / f"{name}.json", origin=ORIGIN, every=0, json=True,
    )


async def run_witness(live_log: LiveLog, tmp_path: Path, capsys: Any, name: str = "w1") -> tuple[int, dict[str, Any]]:
    from juki.cli.audit import cmd_witness

    capsys.readouterr()
    code = await cmd_witness(witness_args(live_log, tmp_path, name))
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def certified(ca: Any, name: str) -> witness.CertifiedWitness:
    cert, _ = ca.cosigning_paths(name)
    return witness.certified_witness(cert.read_bytes(), ca.ca_cert_path.read_bytes())


async def test_a_witness_cosigns_consistent_checkpoints_and_the_log_serves_them(
    live_log: LiveLog, tmp_path: Path, capsys: Any
) -> None:
    await fill(live_log, 10)
    code, first = await run_witness(live_log, tmp_path, capsys)
    assert code == 0 and first["cosigned"] and first["tree_size"] == 10 and first["previous_tree_size"] == 0
    auditor = live_log.stub("operator", "demo-operator")
    served = await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    assert served.witnessed_checkpoint.startswith(f"{ORIGIN}\n10\n")
    w1 = certified(live_log.ca, "w1")
    assert [witness.certified_witness(pem.encode(), live_log.ca.ca_cert_path.read_bytes()).name
            for pem in served.witness_certificates] == ["w1"]
    # The cosignature is a C2SP cosignature/v1 line by the certified key, next to the log's own signature.
    assert 0 < w1.verifier().verify(served.witnessed_checkpoint) <= int(time.time())
    assert live_log.app.verifier.note_verifier(ORIGIN).verify_checkpoint(served.witnessed_checkpoint).tree_size == 10
    assert witness.check_cosignatures(served.witnessed_checkpoint, ORIGIN, list(served.witness_certificates),
                                      live_log.ca.ca_cert_path.read_bytes()) == ["w1"]
    # Nothing new: nothing cosigned again.
    code, same = await run_witness(live_log, tmp_path, capsys)
    assert code == 0 and not same["cosigned"] and same["tree_size"] == 10

    await fill(live_log, 300, seed=2)
    code, second = await run_witness(live_log, tmp_path, capsys)
    assert code == 0 and second["cosigned"] and (second["previous_tree_size"], second["tree_size"]) == (10, 310)
    assert json.loads((tmp_path / "w1.json").read_text())["tree_size"] == 310
    # A second witness cosigns the same checkpoint: the log serves both lines.
    code, other = await run_witness(live_log, tmp_path, capsys, name="w2")
    assert code == 0 and other["witnesses"] == 2
    served = await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    assert sorted(witness.check_cosignatures(served.witnessed_checkpoint, ORIGIN, list(served.witness_certificates),
                                             live_log.ca.ca_cert_path.read_bytes())) == ["w1", "w2"]

    # Listings prove the records the witnessed tree holds into it, newer ones into the latest tree.
    await fill(live_log, 5, seed=3)
    latest = await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    size = int(latest.tree_checkpoint.split("\n")[1])
    assert size == 315
    roots = {n: notes.parse_checkpoint(note.split("\n\n")[0] + "\n").root_hash
             for n, note in ((310, served.witnessed_checkpoint), (315, latest.tree_checkpoint))}
    reader = live_log.stub("service", "disclosure")
    for code_, expected_size in ((codes(300, seed=2)[7], 310), (codes(5, seed=3)[2], 315)):
        listed = await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(
            resident_code=code_, proof_tree_size=size, witnessed_tree_size=310))
        logged = listed.provisions[0]
        assert logged.proof_tree_size == expected_size
        assert merkle.verify_inclusion(merkle.leaf_hash(logged.leaf), logged.sequence - 1, expected_size,
                                       list(logged.inclusion_proof), roots[expected_size])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(
            resident_code=codes(5, seed=3)[2], proof_tree_size=310, witnessed_tree_size=315))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(caught.value) == ["witnessed_tree_size"]


async def test_two_roots_for_one_size_are_a_split_view_the_witness_refuses(
    live_log: LiveLog, tmp_path: Path, capsys: Any, database: Any
) -> None:
    await fill(live_log, 5)
    code, first = await run_witness(live_log, tmp_path, capsys)
    assert code == 0 and first["tree_size"] == 5
    honest_root = first["root"]
    # The log (its key) signs a second, different root for the same size and serves it as the latest.
    forged_root = bytes(range(32))
    assert live_log.app.signer is not None
    forged = live_log.app.signer.note_signer(ORIGIN).sign(notes.Checkpoint(ORIGIN, 5, forged_root).body())
    conn = await asyncpg.connect(database.admin_url)
    try:
        await conn.execute(f'INSERT INTO "{live_log.schema}".tree_checkpoints (tree_size, root_hash, signed_at_ns,'
                           " note) VALUES (5, $1, $2, $3)", forged_root, time.time_ns() + 10**9, forged)
        code, split = await run_witness(live_log, tmp_path, capsys)
        assert code == 1 and split["split_view"]
        assert honest_root in split["problem"] and base64.b64encode(forged_root).decode() in split["problem"]
        assert "two roots for tree size 5" in split["problem"]
        # Nothing cosigned, and the witness keeps the view it vouched for.
        assert await conn.fetchval(f'SELECT count(*) FROM "{live_log.schema}".cosignatures') == 1
        assert json.loads((tmp_path / "w1.json").read_text())["root_hash"] == honest_root
    finally:
        await conn.close()


async def test_a_tree_that_does_not_extend_the_cosigned_one_is_a_split_view(
    live_log: LiveLog, tmp_path: Path, capsys: Any, database: Any
) -> None:
    await fill(live_log, 300)
    code, first = await run_witness(live_log, tmp_path, capsys)
    assert code == 0 and first["tree_size"] == 300
    # Rewrite the stored hash of the first 256 leaves (tile 1/0, the node proofs and roots read): the tree
    # the log signs next forks from the one the witness cosigned.
    conn = await asyncpg.connect(database.admin_url)
    try:
        table = f'"{live_log.schema}".tiles'
        assert await conn.execute(f"UPDATE {table} SET hashes = $1 WHERE level = 1 AND tile_index = 0"
                                  " AND end_width = 1", bytes(32)) == "UPDATE 1"
    finally:
        await conn.close()
    await fill(live_log, 10, seed=2)
    code, split = await run_witness(live_log, tmp_path, capsys)
    assert code == 1 and split["split_view"]
    assert "is not consistent with the tree of size 300" in split["problem"] and first["root"] in split["problem"]
    assert "tree of size 310" in split["problem"]
    assert json.loads((tmp_path / "w1.json").read_text())["tree_size"] == 300


async def test_cosignatures_by_keys_the_ca_did_not_certify_are_refused(live_log: LiveLog, tmp_path: Path) -> None:
    await fill(live_log, 4)
    ca = live_log.ca
    ca_pem = ca.ca_cert_path.read_bytes()
    ca.issue("witness", "w1")
    ca.issue("witness", "w2")
    stub = live_log.stub("witness", "w1")
    reply = await stub.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    note = reply.tree_checkpoint
    now = int(time.time())
    w1_cert = ca.cosigning_paths("w1")[0].read_text()

    async def refused(request: accesslog_pb2.AddCosignatureRequest, caller: Any = stub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await caller.AddCosignature(request)
        return caught.value

    # w1's certificate, but a key it does not certify: the unknown key is named and refused.
    rogue = notes.Cosigner(witness.key_name("w1"), ed25519.Ed25519PrivateKey.generate())
    error = await refused(accesslog_pb2.AddCosignatureRequest(
        cosigned_checkpoint=rogue.cosign(note, now), witness_certificate=w1_cert))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "juki.local/witness/w1" in error.details() and certified(ca, "w1").key_id in error.details()
    assert f"the line's key id is {rogue.key_id.hex()}" in error.details()
    # A certificate from another CA.
    elsewhere = CertificateAuthority(tmp_path / "other-ca")
    elsewhere.create()
    elsewhere.issue("witness", "w1")
    error = await refused(accesslog_pb2.AddCosignatureRequest(
        cosigned_checkpoint=rogue.cosign(note, now),
        witness_certificate=elsewhere.cosigning_paths("w1")[0].read_text()))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "not issued by the mesh CA" in error.details()
    # w1 submitting w2's cosignature (w2's certified key), or the log's own signing certificate.
    w2_key = ed25519.Ed25519PrivateKey.from_private_bytes(
        _raw_private(ca.cosigning_paths("w2")[1].read_bytes()))
    error = await refused(accesslog_pb2.AddCosignatureRequest(
        cosigned_checkpoint=notes.Cosigner(witness.key_name("w2"), w2_key).cosign(note, now),
        witness_certificate=ca.cosigning_paths("w2")[0].read_text()))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "witness w2" in error.details()
    assert live_log.settings.accesslog.signing_cert_file is not None
    signing_cert = Path(live_log.settings.accesslog.signing_cert_file).read_text()
    error = await refused(accesslog_pb2.AddCosignatureRequest(
        cosigned_checkpoint=rogue.cosign(note, now), witness_certificate=signing_cert))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "witness identity" in error.details()
    # The right key, but a checkpoint the log never signed, or no cosignature at all: the field is named.
    w1_key = ed25519.Ed25519PrivateKey.from_private_bytes(_raw_private(ca.cosigning_paths("w1")[1].read_bytes()))
    assert live_log.app.signer is not None
    unsigned = live_log.app.signer.note_signer(ORIGIN).sign(notes.Checkpoint(ORIGIN, 4, bytes(32)).body())
    future = notes.Cosigner(witness.key_name("w1"), w1_key).cosign(note, now + 3600)
    for bad in (notes.Cosigner(witness.key_name("w1"), w1_key).cosign(unsigned, now), note, "not a note", future):
        error = await refused(accesslog_pb2.AddCosignatureRequest(cosigned_checkpoint=bad, witness_certificate=w1_cert))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert _bad_fields(error) == ["cosigned_checkpoint"]
    # Deny by default: only witnesses cosign, and a witness may do nothing else.
    good = notes.Cosigner(witness.key_name("w1"), w1_key).cosign(note, now)
    error = await refused(accesslog_pb2.AddCosignatureRequest(cosigned_checkpoint=good, witness_certificate=w1_cert),
                          caller=live_log.stub("service", "lookup"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    for call in (stub.Append(accesslog_pb2.AppendRequest()),
                 stub.ListProvisions(accesslog_pb2.ListProvisionsRequest(resident_code=codes(1)[0])),
                 stub.VerifyLog(accesslog_pb2.VerifyLogRequest())):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    accepted = await stub.AddCosignature(accesslog_pb2.AddCosignatureRequest(
        cosigned_checkpoint=good, witness_certificate=w1_cert))
    assert (accepted.tree_size, accepted.witnesses) == (4, 1)
    assert ca_pem  # the CA is the only trust anchor used above


def _raw_private(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


async def test_a_log_smaller_than_the_tree_cosigned_before_is_a_split_view(
    live_log: LiveLog, tmp_path: Path, capsys: Any
) -> None:
    await fill(live_log, 10)
    # The witness cosigned a tree of 50 leaves this log signed for it (another view than the one served now).
    assert live_log.app.signer is not None
    other_view = live_log.app.signer.note_signer(ORIGIN).sign(notes.Checkpoint(ORIGIN, 50, bytes(32)).body())
    witness.WitnessState(ORIGIN, 50, bytes(32), other_view).save(tmp_path / "w1.json")
    code, split = await run_witness(live_log, tmp_path, capsys)
    assert code == 1 and split["split_view"] and "the log shrank" in split["problem"], split
    assert "size 50" in split["problem"] and "size 10" in split["problem"]


async def test_the_audit_checks_stored_cosignatures(
    live_log: LiveLog, tmp_path: Path, capsys: Any, database: Any
) -> None:
    from tests.integration.accesslog.test_tamper import audit

    await fill(live_log, 12)
    code, _ = await run_witness(live_log, tmp_path, capsys)
    assert code == 0
    code, report = await audit(database, live_log.ca, live_log.schema, "--full")
    assert code == 0, report
    # A cosignature line forged in the database (another key under w1's name) is named by the audit.
    rogue = notes.Cosigner(witness.key_name("w1"), ed25519.Ed25519PrivateKey.generate())
    served = await live_log.stub("operator", "demo-operator").GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    body = served.tree_checkpoint[:served.tree_checkpoint.rfind("\n\n") + 1]
    conn = await asyncpg.connect(database.admin_url)
    try:
        await conn.execute(f'UPDATE "{live_log.schema}".cosignatures SET line = $1',
                           rogue.cosignature_line(body, int(time.time())))
    finally:
        await conn.close()
    code, report = await audit(database, live_log.ca, live_log.schema, "--full")
    assert code == 1 and report["first_bad_sequence"] == 12, report
    assert "the cosignature of witness w1 at tree size 12 does not verify" in report["problem"], report


async def test_a_revoked_witness_key_is_refused(live_log: LiveLog) -> None:
    await fill(live_log, 3)
    ca = live_log.ca
    ca.issue("witness", "w-revoked")
    ca.issue("witness", "w-other")
    cert, key = ca.cosigning_paths("w-revoked")
    reply = await live_log.stub("witness", "w-other").GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    line = notes.Cosigner(witness.key_name("w-revoked"), ed25519.Ed25519PrivateKey.from_private_bytes(
        _raw_private(key.read_bytes()))).cosign(reply.tree_checkpoint, int(time.time()))
    ca.revoke("witness", "w-revoked")  # its TLS identity and its cosigning key
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await live_log.stub("witness", "w-other").AddCosignature(accesslog_pb2.AddCosignatureRequest(
            cosigned_checkpoint=line, witness_certificate=cert.read_text()))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "the witness certificate is revoked" in caught.value.details()
