"""Audit verbs: ``juki audit verify`` (recompute the access log's chain and Merkle tree and check its
checkpoints), ``juki audit witness`` (cosign the log's checkpoints as a witness, refusing a split view; see
juki.accesslog.witness) and ``juki audit purge`` (the privileged retention purge, by monthly partition).

``verify`` is incremental: it keeps, in a state file of its own (``--state``, by default
``<data dir>/audit/<schema>.json``), the tree state at the last signed checkpoint it verified, and the
next run continues from there: the stored tree must still have that root at that size, the consistency
proof from it to the latest checkpoint must verify, and only the records appended since are hashed.
``--full`` recomputes the whole log (and every stored tile hash) from its first record.

``verify`` reads the database directly with the administrative URL of the local mesh (from
``endpoints.json``) or ``--database-url``, and checks checkpoint signatures against the signing
certificate, itself checked against the mesh CA: the auditor trusts neither the service nor its role.
With ``--via-service`` it asks the running access-log service instead (VerifyLog, as an operator).
Exit status: 0 when intact, 1 when a problem was found (the first bad sequence is named), 2 on bad
settings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg

from juki.accesslog import chain
from juki.accesslog.retention import DEFAULT_RETENTION, purge
from juki.accesslog.verify import DEFAULT_ORIGIN, TreeState, verify_log
from juki.cli.main import add_data_dir
from juki.mesh.errors import SettingsError
from juki.mesh.settings import default_data_dir
from juki.mesh.supervisor import read_endpoints


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="verify the access log's integrity; purge past retention")
    asub = audit.add_subparsers(dest="audit_command", required=True)

    verify = asub.add_parser("verify", help="recompute the access log's hash chain and check every checkpoint")
    add_data_dir(verify)
    _add_database_options(verify)
    verify.add_argument("--via-service", action="store_true",
                        help="ask the running access-log service (VerifyLog) instead of reading the database")
    verify.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _add_state_options(verify)
    verify.set_defaults(func=cmd_verify)

    witness = asub.add_parser(
        "witness", help="as a witness of the access log: check its latest checkpoint extends the one cosigned"
                        " before, and cosign it (C2SP tlog-cosignature); a split view is reported, never cosigned")
    add_data_dir(witness)
    witness.add_argument("--name", default="local", help="the witness's name: spiffe://juki.local/witness/NAME")
    witness.add_argument("--address", help="the access log's address (default: the local mesh's)")
    witness.add_argument("--ca", type=Path, help="mesh CA certificate (default: the local mesh's)")
    witness.add_argument("--pki", type=Path,
                         help="folder of the witness's certificates witness/NAME{.crt,.key,.cosign.crt,.cosign.key}"
                              " (default: the local mesh's PKI, which issues them when missing)")
    witness.add_argument("--state", type=Path,
                         help="the last checkpoint cosigned (default: <data dir>/witness/<name>.json)")
    witness.add_argument("--origin", default=DEFAULT_ORIGIN, help=f"the log's origin (default {DEFAULT_ORIGIN})")
    witness.add_argument("--every", type=float, default=0,
                         help="cosign again every so many seconds until stopped (default: once)")
    witness.add_argument("--json", action="store_true", help="print each round as one JSON object")
    witness.set_defaults(func=cmd_witness)

    purge_parser = asub.add_parser(
        "purge", help="drop the monthly partitions of records older than the retention period (no row is"
                      " deleted), anchored by a signed purge checkpoint; the tree's tiles stay"
    )
    add_data_dir(purge_parser)
    _add_database_options(purge_parser)
    purge_parser.add_argument("--older-than-days", type=float, default=DEFAULT_RETENTION.days,
                              help=f"retention period in days (default {DEFAULT_RETENTION.days}, 7 years)")
    purge_parser.add_argument("--signing-key", type=Path, help="checkpoint signing key (default: the mesh PKI's)")
    _add_state_options(purge_parser)  # a purge verifies first, from the same state as `verify`
    purge_parser.set_defaults(func=cmd_purge)


def _add_state_options(parser: argparse.ArgumentParser) -> None:
    """The auditor's state, shared by ``verify`` and ``purge``: both continue from the last verified checkpoint."""
    parser.add_argument("--full", action="store_true",
                        help="recompute the whole log instead of continuing from the last verified checkpoint")
    parser.add_argument("--state", type=Path,
                        help="the auditor's state file (default: <data dir>/audit/<schema>.json)")
    parser.add_argument("--origin", default=DEFAULT_ORIGIN, help=f"the log's origin (default {DEFAULT_ORIGIN})")


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="administrative URL (default: the local mesh's, from endpoints.json)")
    parser.add_argument("--schema", default="accesslog", help="schema of the access log (default accesslog)")
    parser.add_argument("--ca", type=Path, help="mesh CA certificate (default: the local mesh's)")
    parser.add_argument("--signing-cert", type=Path, help="checkpoint signing certificate (default: the mesh PKI's)")


def _pki_root(args: argparse.Namespace) -> Path | None:
    data_dir = (args.data_dir or default_data_dir()).expanduser()
    return data_dir / "pki" if (data_dir / "pki").is_dir() else None


def _resolve(args: argparse.Namespace) -> tuple[str, Path, Path]:
    url = args.database_url
    if url is None:
        endpoints = read_endpoints((args.data_dir or default_data_dir()).expanduser())
        url = endpoints["database"]["admin_url"]
    root = _pki_root(args)
    ca = args.ca or (root / "ca.crt" if root else None)
    cert = args.signing_cert or (root / "signing" / "accesslog.crt" if root else None)
    if ca is None or cert is None or not Path(ca).is_file() or not Path(cert).is_file():
        raise SettingsError("cannot find the mesh CA and signing certificate: pass --ca and --signing-cert")
    return str(url), Path(ca), Path(cert)


def _state_file(args: argparse.Namespace) -> Path:
    if args.state is not None:
        return Path(args.state)
    return (args.data_dir or default_data_dir()).expanduser() / "audit" / f"{args.schema}.json"


def _load_state(path: Path, origin: str) -> TreeState | None:
    """The tree state of the last verified checkpoint; None (a full run) when absent or unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("origin") != origin:
            return None
        return TreeState.from_json(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        print(f"warning: ignoring the audit state {path} ({exc}); verifying the whole log", file=sys.stderr)
        return None


def _save_state(path: Path, origin: str, state: TreeState, note: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"origin": origin, "checkpoint": note, **state.to_json()}), encoding="utf-8")
    temporary.replace(path)  # never a half-written state


async def cmd_verify(args: argparse.Namespace) -> int:
    if args.via_service:
        return await _verify_via_service(args)
    url, ca, cert = _resolve(args)
    verifier = chain.CheckpointVerifier(cert, ca)
    state_file = _state_file(args)
    resume = None if args.full else _load_state(state_file, args.origin)
    from juki.extras import need

    need("rich", "cli", "juki audit verify")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    conn = await asyncpg.connect(url)
    try:
        total = await conn.fetchval(f'SELECT count(*) FROM "{args.schema}".records')
        with Progress(
            TextColumn("verifying access log"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            transient=True, disable=args.json or not sys.stderr.isatty(),
        ) as progress:
            task = progress.add_task("verify", total=total)
            result = await verify_log(
                conn, verifier, schema=args.schema, resume=resume, origin=args.origin,
                progress=lambda done, _total: progress.update(task, completed=done),
            )
    finally:
        await conn.close()
    latest = result.latest_checkpoint
    tree = result.tree
    if result.ok and tree is not None and tree.at_latest is not None and tree.latest is not None:
        _save_state(state_file, args.origin, tree.at_latest, tree.latest.note)
    return _report(args, {
        "mode": "incremental" if tree is not None and tree.resumed_from else "full",
        "resumed_from_tree_size": tree.resumed_from if tree is not None else 0,
        "records_hashed": tree.records_hashed if tree is not None else 0,
        "tree_checkpoints_checked": tree.checkpoints_checked if tree is not None else 0,
        "latest_tree_size": tree.latest.tree_size if tree is not None and tree.latest is not None else 0,
        "consistency_proof_checked": bool(tree is not None and tree.consistency_checked),
        "ok": result.ok,
        "records_checked": result.records_checked,
        "checkpoints_checked": result.checkpoints_checked,
        "first_sequence": result.first_sequence,
        "last_sequence": result.last_sequence,
        "first_bad_sequence": result.first_bad_sequence,
        "problem": result.problem,
        "latest_checkpoint_sequence": latest.sequence if latest else 0,
        "signing_key_id": verifier.key_id,
    })


async def _verify_via_service(args: argparse.Namespace) -> int:
    from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
    from juki.mesh.client import MeshClient

    async with MeshClient(args.data_dir, identity="operator") as client:
        stub = accesslog_pb2_grpc.AccessLogServiceStub(client.channel("accesslog"))
        reply = await stub.VerifyLog(accesslog_pb2.VerifyLogRequest(), timeout=3600)
    return _report(args, {
        "ok": reply.ok,
        "records_checked": reply.records_checked,
        "checkpoints_checked": reply.checkpoints_checked,
        "first_bad_sequence": reply.first_bad_sequence,
        "problem": reply.problem,
        "latest_checkpoint_sequence": reply.latest_checkpoint.sequence,
    })


def _report(args: argparse.Namespace, figures: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(figures, ensure_ascii=False))
    elif figures["ok"]:
        print(f"access log intact: {figures['records_checked']} records chain, "
              f"{figures['checkpoints_checked']} checkpoint(s) verify "
              f"(latest covers sequence {figures['latest_checkpoint_sequence']})")
        if figures.get("mode"):
            print(f"Merkle tree: {figures['mode']} verification"
                  + (f" from the checkpoint of size {figures['resumed_from_tree_size']}"
                     if figures["resumed_from_tree_size"] else "")
                  + f", {figures['records_hashed']} leaves hashed, {figures['tree_checkpoints_checked']} signed tree"
                  f" checkpoint(s) verify (latest of size {figures['latest_tree_size']})"
                  + (", consistency proof verified" if figures["consistency_proof_checked"] else ""))
    else:
        print(f"access log TAMPERED: first bad sequence {figures['first_bad_sequence']}: {figures['problem']}")
    return 0 if figures["ok"] else 1


def _signing_key(args: argparse.Namespace) -> Path:
    root = _pki_root(args)
    key = args.signing_key or (root / "signing" / "accesslog.key" if root else None)
    if key is None or not Path(key).is_file():
        raise SettingsError("cannot find the checkpoint signing key: pass --signing-key")
    return Path(key)


async def cmd_purge(args: argparse.Namespace) -> int:
    url, ca, cert = _resolve(args)
    key = _signing_key(args)
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=args.older_than_days)
    state_file = _state_file(args)
    resume = None if args.full else _load_state(state_file, args.origin)
    conn = await asyncpg.connect(url)
    try:
        result = await purge(conn, args.schema, chain.Signer(Path(key)), chain.CheckpointVerifier(cert, ca),
                             older_than=cutoff, origin=args.origin, resume=resume)
    finally:
        await conn.close()
    if result.problem:
        print(f"error: {result.problem}", file=sys.stderr)
        return 1
    tree = result.tree
    if tree is not None and tree.at_latest is not None and tree.latest is not None:
        _save_state(state_file, args.origin, tree.at_latest, tree.latest.note)
    print(json.dumps({"purged": result.purged, "anchor_sequence": result.anchor_sequence,
                      "cutoff": cutoff.isoformat(), "partitions_dropped": result.partitions,
                      "verification": result.verification, "records_hashed": result.records_hashed,
                      **({"kept": result.kept} if result.kept else {})}))
    return 0


async def cmd_witness(args: argparse.Namespace) -> int:
    """One witness round (or one every ``--every`` seconds). Exit 0 when cosigned or unchanged, 1 on a split
    view (both roots named, nothing cosigned), 2 on bad settings."""
    import asyncio
    import base64
    import time

    import grpc
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from juki._gen.juki.accesslog.v1 import accesslog_pb2_grpc
    from juki.accesslog import witness
    from juki.mesh.pki import CertificateAuthority, PkiError
    from juki.mesh.settings import TlsFiles
    from juki.mesh.tls import secure_channel

    data_dir = (args.data_dir or default_data_dir()).expanduser()
    pki = CertificateAuthority(Path(args.pki) if args.pki else data_dir / "pki")
    ca = Path(args.ca) if args.ca else pki.ca_cert_path
    cert, key = pki.paths("witness", args.name)
    cosign_cert, cosign_key = pki.cosigning_paths(args.name)
    if not all(p.is_file() for p in (cert, key, cosign_cert, cosign_key)):
        if not pki.exists():
            raise SettingsError(f"no certificates of witness {args.name} in {pki.root}/witness and no CA to issue"
                                " them: pass --pki")
        try:
            pki.issue("witness", args.name, display_name=f"access-log witness {args.name}")
        except PkiError as exc:
            raise SettingsError(str(exc)) from exc
    if not ca.is_file():
        raise SettingsError("cannot find the mesh CA certificate: pass --ca")
    private = serialization.load_pem_private_key(cosign_key.read_bytes(), password=None)
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise SettingsError(f"{cosign_key}: a witness's cosigning key is Ed25519")
    address = args.address or str(read_endpoints(data_dir)["services"]["accesslog"]["address"])
    state_file = Path(args.state) if args.state else data_dir / "witness" / f"{args.name}.json"
    me = witness.Witness(args.name, private, cosign_cert.read_text(encoding="ascii"), ca.read_bytes(), state_file,
                         args.origin)
    channel = secure_channel(address, TlsFiles(ca=ca, cert=cert, key=key))
    try:
        stub = accesslog_pb2_grpc.AccessLogServiceStub(channel)
        while True:
            try:
                result = await me.round(stub, now=int(time.time()))
            except witness.SplitView as split:
                figures = {"ok": False, "split_view": True, "witness": args.name, "problem": str(split)}
                print(json.dumps(figures, ensure_ascii=False) if args.json
                      else f"SPLIT VIEW: witness {args.name} refuses to cosign: {split}")
                return 1
            except grpc.aio.AioRpcError as exc:
                print(f"error: the access log answered {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            root = base64.b64encode(result.root_hash).decode()
            figures = {"ok": True, "witness": args.name, "tree_size": result.tree_size, "root": root,
                       "previous_tree_size": result.previous_size, "cosigned": result.cosigned,
                       "witnesses": result.witnesses}
            if args.json:
                print(json.dumps(figures), flush=True)
            elif result.cosigned:
                print(f"witness {args.name} cosigned the checkpoint of tree size {result.tree_size} (root {root})"
                      + (f", consistent with size {result.previous_size} cosigned before" if result.previous_size
                         else ""), flush=True)
            else:
                print(f"witness {args.name}: the log has not grown since size {result.tree_size} (root {root})",
                      flush=True)
            if args.every <= 0:
                return 0
            await asyncio.sleep(args.every)
    finally:
        await channel.close()
