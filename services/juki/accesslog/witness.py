"""Witnesses of the access log: certified cosigning keys, the witness's own state, split-view detection.

A witness (``spiffe://juki.local/witness/NAME``, run by ``juki audit witness``) fetches the log's latest
signed tree checkpoint with the consistency proof from the last checkpoint it cosigned, and cosigns the
new one (C2SP tlog-cosignature, cosignature/v1, juki.accesslog.notes.Cosigner) only when:

- the checkpoint is signed by the key the mesh CA certified for the log's signing identity;
- it is not smaller than the one it cosigned before (a log never shrinks);
- at the same size it has the same root (two roots for one size are a split view);
- at a larger size the consistency proof from the cosigned checkpoint verifies (else the new tree does
  not extend the old one: a fork, i.e. a split view).

Its cosigning key is an Ed25519 key the mesh CA certified for the witness's SPIFFE id; the key name of its
cosignatures is that id without the scheme (``juki.local/witness/NAME``). A verifier (the log accepting a
cosignature, ``juki proof verify`` checking a disclosure) takes the witness's key only from such a
certificate. Pure functions and a state file; the RPCs are the caller's.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from juki.accesslog import chain, merkle, notes
from juki.mesh.settings import spiffe_id

SPIFFE_PREFIX = spiffe_id("witness", "")
KEY_NAME_PREFIX = "juki.local/witness/"


class SplitView(Exception):
    """The log showed this witness two views that cannot both be true: refuse to cosign, report it."""


def key_name(witness: str) -> str:
    return KEY_NAME_PREFIX + witness


@dataclass(frozen=True)
class CertifiedWitness:
    name: str  # NAME of spiffe://juki.local/witness/NAME
    key_name: str
    public_key: ed25519.Ed25519PublicKey
    certificate_pem: str

    def verifier(self) -> notes.CosignatureVerifier:
        return notes.CosignatureVerifier(self.key_name, self.public_key)

    @property
    def key_id(self) -> str:
        return notes.cosignature_key_id(self.key_name, self.public_key).hex()


def certified_witness(
    cert_pem: bytes, ca_pem: bytes, *, at: dt.datetime | None = None, revoked: frozenset[int] = frozenset()
) -> CertifiedWitness:
    """The witness a certificate names, once it is shown to be the mesh CA's certificate of an Ed25519
    cosigning key for a witness identity (valid at ``at`` and not among the ``revoked`` serials, when
    given). ValueError naming what fails otherwise."""
    cert, uris = chain.ca_certificate(cert_pem, ca_pem, "the witness certificate", at=at)
    if cert.serial_number in revoked:
        raise ValueError("the witness certificate is revoked")
    witnesses = [uri[len(SPIFFE_PREFIX):] for uri in uris if uri.startswith(SPIFFE_PREFIX)]
    if len(witnesses) != 1 or not witnesses[0] or "/" in witnesses[0]:
        raise ValueError(f"the certificate is not for a witness identity ({SPIFFE_PREFIX}NAME)")
    public_key = cert.public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise ValueError(f"the certificate of witness {witnesses[0]} does not hold an Ed25519 cosigning key")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return CertifiedWitness(witnesses[0], key_name(witnesses[0]), public_key, pem)


def cosigners(note: str, origin: str) -> list[str]:
    """Key names of the lines of a note other than the log's own signature (its cosignatures)."""
    return [name for name in notes.signer_names(note) if name != origin]


def check_cosignatures(note: str, origin: str, certificates: list[str], ca_pem: bytes) -> list[str]:
    """The witnesses whose cosignature lines on ``note`` verify against their CA-certified keys.

    ValueError naming the first line by a witness no certificate is given for (an unknown key), or whose
    cosignature does not verify by the certified key.
    """
    known: dict[str, CertifiedWitness] = {}
    for pem in certificates:
        certified = certified_witness(pem.encode(), ca_pem)
        known[certified.key_name] = certified
    verified: list[str] = []
    for name in cosigners(note, origin):
        certified_key = known.get(name)
        if certified_key is None:
            raise ValueError(f"a cosignature by {name}, whose key no certificate of the mesh CA names (unknown witness)")
        try:
            certified_key.verifier().verify(note)
        except notes.NoteError as exc:
            raise ValueError(str(exc)) from exc
        verified.append(certified_key.name)
    return verified


@dataclass(frozen=True)
class WitnessState:
    """The last checkpoint this witness cosigned."""

    origin: str
    tree_size: int
    root_hash: bytes
    note: str

    def to_json(self) -> str:
        return json.dumps({"origin": self.origin, "tree_size": self.tree_size,
                           "root_hash": base64.b64encode(self.root_hash).decode(), "checkpoint": self.note})

    @classmethod
    def load(cls, path: Path) -> WitnessState | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return cls(str(data["origin"]), int(data["tree_size"]), base64.b64decode(data["root_hash"]),
                   str(data["checkpoint"]))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(self.to_json(), encoding="utf-8")
        temporary.replace(path)  # never a half-written state


def root_text(root: bytes) -> str:
    return base64.b64encode(root).decode()


def check_extension(state: WitnessState | None, new: notes.Checkpoint, proof: list[bytes]) -> None:
    """SplitView unless ``new`` extends what the witness cosigned before (``state``), by ``proof``."""
    if state is None:
        return
    if new.origin != state.origin:
        raise SplitView(f"the checkpoint is of origin {new.origin}, the witness follows {state.origin}")
    old_root, new_root = root_text(state.root_hash), root_text(new.root_hash)
    if new.tree_size < state.tree_size:
        raise SplitView(f"the log shrank: it served size {new.tree_size} (root {new_root}) after the witness"
                        f" cosigned size {state.tree_size} (root {old_root})")
    if new.tree_size == state.tree_size:
        if new.root_hash != state.root_hash:
            raise SplitView(f"two roots for tree size {new.tree_size}: {old_root} (cosigned before) and"
                            f" {new_root} (served now)")
        return
    if not merkle.verify_consistency(state.tree_size, new.tree_size, state.root_hash, new.root_hash, proof):
        raise SplitView(f"the tree of size {new.tree_size} (root {new_root}) is not consistent with the tree of"
                        f" size {state.tree_size} (root {old_root}) the witness cosigned: the consistency proof"
                        " does not verify")


@dataclass(frozen=True)
class RoundResult:
    tree_size: int
    root_hash: bytes
    previous_size: int
    cosigned: bool  # False when the log had not grown since the last cosignature
    witnesses: int = 0


class Witness:
    """One witness of one log: its cosigning key, the CA it trusts, and its state file."""

    def __init__(self, name: str, private_key: ed25519.Ed25519PrivateKey, certificate_pem: str, ca_pem: bytes,
                 state_file: Path, origin: str) -> None:
        self.name = name
        self.cosigner = notes.Cosigner(key_name(name), private_key)
        self.certificate_pem = certificate_pem
        self.ca_pem = ca_pem
        self.state_file = state_file
        self.origin = origin

    async def round(self, stub: object, *, now: int) -> RoundResult:
        """Fetch the latest checkpoint, check it against the last one cosigned, cosign and submit it.

        SplitView (nothing cosigned, the state kept) when the log's views disagree. ``stub`` is an
        AccessLogService stub over the witness's own mTLS identity.
        """
        import grpc

        from juki._gen.juki.accesslog.v1 import accesslog_pb2
        from juki.accesslog import chain

        state = WitnessState.load(self.state_file)
        if state is not None and state.origin != self.origin:
            raise ValueError(f"{self.state_file}: the state is of log {state.origin}, not {self.origin}")
        try:
            reply = await stub.GetCheckpoint(  # type: ignore[attr-defined]
                accesslog_pb2.GetCheckpointRequest(since_checkpoint=state.note if state else ""), timeout=60)
        except grpc.aio.AioRpcError as exc:
            if state is None or exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # The log refuses the checkpoint cosigned before (larger than its tree): see what it serves now.
            reply = await stub.GetCheckpoint(accesslog_pb2.GetCheckpointRequest(), timeout=60)  # type: ignore[attr-defined]
        try:
            log_key = chain.signing_public_key(reply.signing_certificate.encode(), self.ca_pem)
            checkpoint = notes.NoteVerifier(self.origin, log_key).verify_checkpoint(reply.tree_checkpoint)
        except (ValueError, notes.NoteError) as exc:
            raise SplitView(f"the log served a checkpoint its certified key did not sign: {exc}") from exc
        check_extension(state, checkpoint, list(reply.consistency_proof))
        previous = state.tree_size if state is not None else 0
        if state is not None and checkpoint.tree_size == state.tree_size:
            return RoundResult(checkpoint.tree_size, checkpoint.root_hash, previous, cosigned=False)
        cosigned = self.cosigner.cosign(reply.tree_checkpoint, now)
        answer = await stub.AddCosignature(accesslog_pb2.AddCosignatureRequest(  # type: ignore[attr-defined]
            cosigned_checkpoint=cosigned, witness_certificate=self.certificate_pem), timeout=60)
        WitnessState(self.origin, checkpoint.tree_size, checkpoint.root_hash, reply.tree_checkpoint).save(
            self.state_file)
        return RoundResult(checkpoint.tree_size, checkpoint.root_hash, previous, cosigned=True,
                           witnesses=int(answer.witnesses))
