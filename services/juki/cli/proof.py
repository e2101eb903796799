"""``juki proof verify FILE``: check a disclosure's proofs offline, with the mesh CA certificate alone.

FILE is the output of ``juki disclose CODE --format json``. In order, stopping at the first failure:

1. the signing certificate in the file is the mesh CA's certificate for the access log's signing identity;
2. every tree checkpoint in the file is a C2SP signed note signed by that key under the log's origin,
   and every other signature line on it is a witness's cosignature (C2SP tlog-cosignature) by a key the
   mesh CA certified for that witness (``spiffe://juki.local/witness/NAME``); a line by any other key fails;
3. for each provision shown: its leaf (the access log's canonical bytes of the record) is the record
   with the shown 記録番号, every shown field is what that record says, and the leaf's inclusion proof
   leads to the root of a verified checkpoint.

Exit status 0 when everything holds; 1 naming the first field or proof that does not; 2 on bad usage.
No network and no database: a resident, a lawyer or a court can run it on the file alone.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki.accesslog import chain, merkle, notes, witness
from juki.cli.disclose import LOG_KEY, PROOF_KEY, provision_row
from juki.cli.main import add_data_dir
from juki.disclosure.service import shown_provision
from juki.domain.policy import Policy
from juki.mesh.errors import SettingsError
from juki.mesh.settings import default_data_dir

DEFAULT_ORIGIN = "juki.local/accesslog"
_HEADER = struct.Struct(">QqqBB")  # the header of juki.accesslog.chain.canonical_bytes
_OLD_CODE = re.compile(r"（旧住民票コード \d{11} による提供）")


class ProofFailure(Exception):
    """The first check that does not hold: ``where`` names the field or proof."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where


def register(sub: Any) -> None:
    proof = sub.add_parser("proof", help="check a disclosure's access-log proofs offline")
    psub = proof.add_subparsers(dest="proof_command", required=True)
    verify = psub.add_parser("verify", help="verify `juki disclose --format json` output with the CA certificate")
    add_data_dir(verify)
    verify.add_argument("file", type=Path, help="the disclosure JSON")
    verify.add_argument("--ca", type=Path, help="mesh CA certificate (default: the local mesh's)")
    verify.add_argument("--origin", default=DEFAULT_ORIGIN, help=f"the access log's origin (default {DEFAULT_ORIGIN})")
    verify.set_defaults(func=cmd_verify)


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise ProofFailure(where, "not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProofFailure(where, "not base64") from exc


def parse_leaf(leaf: bytes, where: str) -> tuple[int, int, accesslog_pb2.ProvisionRecord]:
    """(sequence, outcome, record) of a leaf: the inverse of juki.accesslog.chain.canonical_bytes."""
    if len(leaf) < _HEADER.size:
        raise ProofFailure(where, "the leaf is too short to be a logged record")
    sequence, _provided_us, _recorded_us, outcome, subject_length = _HEADER.unpack_from(leaf)
    payload = leaf[_HEADER.size + subject_length:]
    try:
        record = accesslog_pb2.ProvisionRecord.FromString(payload)
    except DecodeError as exc:
        raise ProofFailure(where, "the leaf does not hold a provision record") from exc
    return sequence, outcome, record


def verify_document(document: Any, ca_pem: bytes, origin: str, summary: dict[str, Any] | None = None) -> int:
    """Check everything; the number of provisions proven. ProofFailure at the first that fails.

    ``summary`` receives ``witnesses`` (names of the witnesses whose cosignatures verified) and
    ``witnessed_provisions`` (provisions proven into a checkpoint a witness cosigned)."""
    if not isinstance(document, dict) or not isinstance(document.get(LOG_KEY), dict):
        raise ProofFailure(LOG_KEY, "the file carries no access-log proofs (not `juki disclose --format json` output)")
    log = document[LOG_KEY]
    try:
        public_key = chain.signing_public_key(str(log.get("signing_certificate", "")).encode(), ca_pem)
    except ValueError as exc:
        raise ProofFailure(f"{LOG_KEY}.signing_certificate", str(exc)) from exc
    verifier = notes.NoteVerifier(origin, public_key)
    roots: dict[int, bytes] = {}
    witnessed: dict[int, list[str]] = {}
    certificates = log.get("witness_certificates") or []
    if not isinstance(certificates, list) or not all(isinstance(c, str) for c in certificates):
        raise ProofFailure(f"{LOG_KEY}.witness_certificates", "not a list of PEM certificates")
    for index, note in enumerate(log.get("checkpoints") or []):
        try:
            checkpoint = verifier.verify_checkpoint(str(note))
        except notes.NoteError as exc:
            raise ProofFailure(f"{LOG_KEY}.checkpoints[{index}]", str(exc)) from exc
        try:
            names = witness.check_cosignatures(str(note), origin, certificates, ca_pem)
        except (ValueError, notes.NoteError) as exc:
            raise ProofFailure(f"{LOG_KEY}.checkpoints[{index}]", str(exc)) from exc
        if names:
            witnessed[checkpoint.tree_size] = names
        if roots.setdefault(checkpoint.tree_size, checkpoint.root_hash) != checkpoint.root_hash:
            raise ProofFailure(f"{LOG_KEY}.checkpoints[{index}]",
                               f"two signed roots for tree size {checkpoint.tree_size}: the log forked")
    policy = Policy.load()
    provisions = document.get("提供状況")
    if not isinstance(provisions, list):
        raise ProofFailure("提供状況", "missing")
    for position, shown in enumerate(provisions):
        where = f"提供状況[{position}]"
        if not isinstance(shown, dict) or not isinstance(shown.get(PROOF_KEY), dict):
            raise ProofFailure(f"{where}.{PROOF_KEY}", "the provision carries no proof")
        proof = shown[PROOF_KEY]
        leaf = _b64(proof.get("leaf"), f"{where}.{PROOF_KEY}.leaf")
        sequence, outcome, record = parse_leaf(leaf, f"{where}.{PROOF_KEY}.leaf")
        if shown.get("記録番号") != sequence:
            raise ProofFailure(f"{where}.記録番号", f"shows {shown.get('記録番号')!r}, the logged record is {sequence}")
        if proof.get("leaf_index") != sequence - 1:
            raise ProofFailure(f"{where}.{PROOF_KEY}.leaf_index", f"record {sequence} is leaf {sequence - 1}")
        if outcome != accesslog_pb2.PROVISION_OUTCOME_PROVIDED:
            raise ProofFailure(where, "the logged record is not a provision")
        expected = provision_row(shown_provision(record, sequence, policy), "")
        for key, value in expected.items():
            got = shown.get(key)
            if key == "提供した情報" and isinstance(got, str) and got.startswith(value) \
                    and (got == value or _OLD_CODE.fullmatch(got[len(value):])):
                continue  # the earlier-code note names a code the log keeps only as a pseudonym
            if got != value:
                raise ProofFailure(f"{where}.{key}", f"shows {got!r}, the logged record says {value!r}")
        size = proof.get("tree_size")
        if not isinstance(size, int) or size not in roots:
            raise ProofFailure(f"{where}.{PROOF_KEY}.tree_size", "no verified checkpoint of that tree size")
        hashes = proof.get("inclusion_proof")
        if not isinstance(hashes, list):
            raise ProofFailure(f"{where}.{PROOF_KEY}.inclusion_proof", "missing")
        path = [_b64(h, f"{where}.{PROOF_KEY}.inclusion_proof[{i}]") for i, h in enumerate(hashes)]
        if not merkle.verify_inclusion(merkle.leaf_hash(leaf), sequence - 1, size, path, roots[size]):
            raise ProofFailure(f"{where}.{PROOF_KEY}",
                               f"the inclusion proof does not lead to the signed root of tree size {size}")
    if summary is not None:
        summary["witnesses"] = sorted({name for names in witnessed.values() for name in names})
        summary["witnessed_provisions"] = sum(
            1 for shown in provisions if shown[PROOF_KEY].get("tree_size") in witnessed)
    return len(provisions)


def _ca(args: argparse.Namespace) -> Path:
    if args.ca is not None:
        return Path(args.ca)
    ca = (args.data_dir or default_data_dir()).expanduser() / "pki" / "ca.crt"
    if not ca.is_file():
        raise SettingsError("cannot find the mesh CA certificate: pass --ca")
    return ca


async def cmd_verify(args: argparse.Namespace) -> int:
    ca_pem = _ca(args).read_bytes()
    try:
        document = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"proof FAILED: {args.file}: not a readable JSON document ({exc})")
        return 1
    summary: dict[str, Any] = {}
    try:
        count = verify_document(document, ca_pem, args.origin, summary)
    except ProofFailure as failure:
        print(f"proof FAILED: {failure}")
        return 1
    print(f"proof holds: the signing certificate chains to the CA, the checkpoints are signed, and each of "
          f"{count} provision(s) shown is the logged record, included in the signed tree")
    if summary["witnesses"]:
        print(f"witnessed: {summary['witnessed_provisions']} of them are proven into a checkpoint cosigned by "
              f"witness(es) {', '.join(summary['witnesses'])}, whose keys the CA certified")
    sys.stdout.flush()
    return 0
