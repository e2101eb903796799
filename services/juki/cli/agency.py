"""Agency verbs against a running mesh: ``juki lookup``, ``juki verify`` and ``juki purposes``.

``juki lookup CODE --purpose P`` looks one resident up by 住民票コード; ``juki verify FILE.csv --purpose
P`` streams a file of codes through batch verification (一括照会) with a progress bar and writes one
result row per input row. Every request names its 事務 (purpose); ``juki purposes`` lists the caller's.
The caller is one of the mesh's demo identities (``--identity``, default the pension service); an
operator identity signs each request with its operator key and ``--password``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki.cli.main import add_data_dir
from juki.mesh.client import MeshClient
from juki.mesh.errors import SettingsError
from juki.mesh.operator import sign_with_files

DEFAULT_BATCH = 5_000
FIELD_CHOICES = ("resident_code", "name", "birth_date", "sex", "address", "change_info")


def register(sub: Any) -> None:
    lookup = sub.add_parser("lookup", help="look a resident up by 住民票コード for a 事務")
    lookup.add_argument("resident_code", help="the 11-digit resident code")
    _common(lookup)
    lookup.add_argument("--fields", nargs="*", choices=FIELD_CHOICES, default=[],
                        help="fields wanted (default: every field the 事務 grants)")
    lookup.set_defaults(func=cmd_lookup)

    verify = sub.add_parser("verify", help="verify a CSV of resident codes in bulk (一括照会)")
    verify.add_argument("file", type=Path,
                        help="CSV with a resident_code column (or codes in the first column); optional"
                             " family_name, given_name and birth_date (YYYY-MM-DD) columns are compared")
    _common(verify)
    verify.add_argument("--out", type=Path, help="results CSV (default: standard output)")
    verify.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"items per message (default {DEFAULT_BATCH})")
    verify.set_defaults(func=cmd_verify)

    purposes = sub.add_parser("purposes", help="list the 事務 the 別表 policy grants the caller")
    add_data_dir(purposes)
    purposes.add_argument("--identity", default="agency", help="demo client identity (default: agency = 日本年金機構)")
    purposes.set_defaults(func=cmd_purposes)


def _common(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    parser.add_argument("--purpose", required=True, help="code of the 事務, e.g. B1-PENSION-BENEFIT (see juki purposes)")
    parser.add_argument("--identity", default="agency", help="demo client identity (default: agency = 日本年金機構)")
    parser.add_argument("--password", default=None, help="operator password, for operator identities (default: the demo operator's)")


def _sign(client: MeshClient, request: Any, method: str, password: str | None) -> None:
    if "/operator/" in client.identity:
        sign_with_files(request, method, client.tls.cert, client.tls.key,
                        password=password if password is not None else client.password)


async def cmd_lookup(args: argparse.Namespace) -> int:
    async with MeshClient(args.data_dir, args.identity) as client:
        stub = lookup_pb2_grpc.LookupServiceStub(client.channel("lookup"))
        request = lookup_pb2.LookupByCodeRequest(
            purpose=args.purpose, resident_code=args.resident_code,
            requested_fields=[common_pb2.Field.Value(f"FIELD_{name.upper()}") for name in args.fields],
        )
        _sign(client, request, "/juki.lookup.v1.LookupService/LookupByCode", args.password)
        response = await stub.LookupByCode(request, timeout=30)
        print(json.dumps(json_format.MessageToDict(response), ensure_ascii=False, indent=2))
    return 0


async def cmd_purposes(args: argparse.Namespace) -> int:
    async with MeshClient(args.data_dir, args.identity) as client:
        stub = lookup_pb2_grpc.LookupServiceStub(client.channel("lookup"))
        response = await stub.ListPurposes(lookup_pb2.ListPurposesRequest(), timeout=30)
        print(json.dumps(json_format.MessageToDict(response), ensure_ascii=False, indent=2))
    return 0


# -- bulk verification ------------------------------------------------------------------------------------

RESULT_COLUMNS = ("row", "resident_code", "status", "new_resident_code", "death_date", "new_address",
                  "mismatched_fields")


def _item(row_number: int, row: dict[str, str]) -> lookup_pb2.VerifyItem:
    item = lookup_pb2.VerifyItem(item_id=row_number, resident_code=(row.get("resident_code") or "").strip())
    family, given = (row.get("family_name") or "").strip(), (row.get("given_name") or "").strip()
    if family or given:
        item.expected_name.family_name = family
        item.expected_name.given_name = given
    birth = (row.get("birth_date") or "").strip()
    if birth:
        parts = birth.split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SettingsError(f"row {row_number}: birth_date must be YYYY-MM-DD, got {birth!r}")
        item.expected_birth_date.year, item.expected_birth_date.month, item.expected_birth_date.day = map(int, parts)
    return item


def read_items(path: Path) -> Iterator[lookup_pb2.VerifyItem]:
    """Items of a CSV: a header naming ``resident_code`` or, without one, codes in the first column."""
    with path.open(newline="", encoding="utf-8") as handle:
        first = handle.readline()
        header = [c.strip() for c in next(csv.reader([first]))] if first else []
        if "resident_code" in header:
            for number, row in enumerate(csv.DictReader(handle, fieldnames=header), start=1):
                yield _item(number, row)
        else:
            handle.seek(0)
            for number, cells in enumerate(csv.reader(handle), start=1):
                if cells:
                    yield _item(number, {"resident_code": cells[0]})


def _count_rows(path: Path) -> int:
    with path.open("rb") as handle:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    with path.open(encoding="utf-8") as handle:
        has_header = "resident_code" in handle.readline()
    return max(lines - (1 if has_header else 0), 0)


def _date(value: common_pb2.Date) -> str:
    return f"{value.year:04d}-{value.month:02d}-{value.day:02d}" if value.year else ""


def _result_row(result: lookup_pb2.VerifyResult, code: str) -> list[str]:
    address = result.new_address
    return [
        str(result.item_id), code,
        lookup_pb2.VerifyStatus.Name(result.status).removeprefix("VERIFY_STATUS_"),
        result.new_resident_code,
        _date(result.death_date) if result.HasField("death_date") else "",
        f"{address.prefecture}{address.municipality}{address.street}" if result.HasField("new_address") else "",
        " ".join(common_pb2.Field.Name(f).removeprefix("FIELD_") for f in result.mismatched_fields),
    ]


async def verify_file(
    stub: lookup_pb2_grpc.LookupServiceStub, items: Iterator[lookup_pb2.VerifyItem], out: TextIO, purpose: str,
    batch: int, progress: Progress | None = None, task: Any = None, sign: Any = None,
) -> dict[str, int]:
    """Stream ``items`` through VerifyBatch (HTTP/2 flow control paces it); write results; count statuses."""
    counts: dict[str, int] = {}

    async def requests() -> AsyncIterator[lookup_pb2.VerifyBatchRequest]:
        first = True
        chunk: list[lookup_pb2.VerifyItem] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= batch:
                yield _message(chunk, first)
                first = False
                chunk = []
        if chunk or first:
            yield _message(chunk, first)

    def _message(chunk: list[lookup_pb2.VerifyItem], first: bool) -> lookup_pb2.VerifyBatchRequest:
        request = lookup_pb2.VerifyBatchRequest(items=chunk)
        if first:
            request.purpose = purpose
            if sign is not None:
                sign(request)
        return request

    writer = csv.writer(out)
    writer.writerow(RESULT_COLUMNS)
    codes_by_item: dict[int, str] = {}
    call = stub.VerifyBatch(_tracking(requests(), codes_by_item))
    async for response in call:
        for result in response.results:
            code = codes_by_item.pop(result.item_id, "")
            row = _result_row(result, code)
            counts[row[2]] = counts.get(row[2], 0) + 1
            writer.writerow(row)
        if progress is not None:
            progress.advance(task, len(response.results))
    return counts


async def _tracking(
    requests: AsyncIterator[lookup_pb2.VerifyBatchRequest], codes_by_item: dict[int, str]
) -> AsyncIterator[lookup_pb2.VerifyBatchRequest]:
    async for request in requests:
        for item in request.items:
            codes_by_item[item.item_id] = item.resident_code
        yield request


async def cmd_verify(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise SettingsError(f"no such file: {args.file}")
    if not 1 <= args.batch <= 50_000:
        raise SettingsError("--batch must be between 1 and 50000")
    total = _count_rows(args.file)
    out = args.out.open("w", newline="", encoding="utf-8") if args.out else sys.stdout
    try:
        async with MeshClient(args.data_dir, args.identity) as client:
            stub = lookup_pb2_grpc.LookupServiceStub(client.channel("lookup"))

            def sign(request: lookup_pb2.VerifyBatchRequest) -> None:
                _sign(client, request, "/juki.lookup.v1.LookupService/VerifyBatch", args.password)

            columns = (TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, console=_stderr_console(), transient=args.out is None) as progress:
                task = progress.add_task("verify", total=total)
                counts = await verify_file(stub, read_items(args.file), out, args.purpose, args.batch,
                                           progress, task, sign)
    finally:
        if args.out:
            out.close()
    print(json.dumps({"rows": sum(counts.values()), **counts}, ensure_ascii=False), file=sys.stderr)
    return 0


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
