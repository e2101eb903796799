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
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from google.protobuf import json_format

from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki.cli.main import add_data_dir
from juki.extras import need
from juki.mesh.client import MeshClient
from juki.mesh.errors import SettingsError
from juki.mesh.operator import sign_with_files

if TYPE_CHECKING:
    from rich.progress import Progress

DEFAULT_BATCH = 5_000
FIELD_CHOICES = ("resident_code", "name", "birth_date", "sex", "address", "change_info")


def register(sub: Any) -> None:
    lookup = sub.add_parser("lookup", help="look a resident up by 住民票コード for a 事務")
    lookup.add_argument("resident_code", help="the 11-digit resident code")
    _common(lookup)
    lookup.add_argument("--fields", nargs="*", choices=FIELD_CHOICES, default=[],
                        help="fields wanted (default: every field the 事務 grants)")
    lookup.set_defaults(func=cmd_lookup)

    verify = sub.add_parser("verify", help="verify a CSV of resident codes in bulk (一括照会)",
                            epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("file", type=Path,
                        help="CSV with a resident_code column (or codes in the first column); optional"
                             " family_name, given_name and birth_date (YYYY-MM-DD) columns are compared")
    _common(verify)
    verify.add_argument("--out", type=Path, help="results CSV (default: standard output)")
    verify.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"items per message (default {DEFAULT_BATCH})")
    verify.set_defaults(func=cmd_verify)

    purposes = sub.add_parser("purposes", help="list the 事務 the 別表 policy grants the caller")
    add_data_dir(purposes)
    purposes.add_argument("--identity", default="agency", help="a demo client (agency = 日本年金機構, the default) or KIND/NAME of any certificate the CA issued")
    purposes.set_defaults(func=cmd_purposes)


def _common(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    parser.add_argument("--purpose", required=True, help="code of the 事務, e.g. B1-PENSION-BENEFIT (see juki purposes)")
    parser.add_argument("--identity", default="agency", help="a demo client (agency = 日本年金機構, the default) or KIND/NAME of any certificate the CA issued")
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
                  "mismatched_fields", "line")

# Exit codes of ``juki verify`` (also in its --help and the README).
EXIT_VERIFIED = 0  # every row was answered
EXIT_FAILED = 1  # the mesh refused or failed the stream (the error is printed); results may be partial
EXIT_USAGE = 2  # bad arguments or settings (no such file, --batch out of range...); nothing was sent
EXIT_BAD_ROWS = 3  # every well-formed row was answered; some rows were not, and are listed by line number
VERIFY_EPILOG = f"""\
Results go to --out (or standard output), one row per answered input row; its "row" column counts the
data rows and "line" gives the row's line in the input file (the header is line 1). A row that cannot
be verified - a resident code with a wrong check digit, the wrong length or other characters than
0-9, or a birth_date that is not YYYY-MM-DD - gets no result row: it is reported on standard error as
"line N: ..." with the reason, and every other row is still verified.

exit codes:
  {EXIT_VERIFIED}  every row was verified
  {EXIT_FAILED}  the mesh refused or failed the stream (e.g. PERMISSION_DENIED for a 事務 not granted)
  {EXIT_USAGE}  bad arguments or settings; nothing was sent
  {EXIT_BAD_ROWS}  some rows were bad (listed by line number); every other row was verified
"""


class BadRow(Exception):
    """A CSV row that cannot become a verification item; the message says why."""


def _item(row_number: int, row: dict[str, str]) -> lookup_pb2.VerifyItem:
    item = lookup_pb2.VerifyItem(item_id=row_number, resident_code=(row.get("resident_code") or "").strip())
    family, given = (row.get("family_name") or "").strip(), (row.get("given_name") or "").strip()
    if family or given:
        item.expected_name.family_name = family
        item.expected_name.given_name = given
    birth = (row.get("birth_date") or "").strip()
    if birth:
        parts = birth.split("-")
        if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
            raise BadRow(f"birth_date must be YYYY-MM-DD, got {birth!r}")
        item.expected_birth_date.year, item.expected_birth_date.month, item.expected_birth_date.day = map(int, parts)
    return item


def read_items(path: Path) -> Iterator[tuple[int, lookup_pb2.VerifyItem | BadRow]]:
    """``(line, item)`` per data row of a CSV, or ``(line, BadRow)`` for a row that cannot become an item.

    The CSV has a header naming ``resident_code`` or, without one, codes in the first column. ``line`` is
    where the row starts in the file (the header is line 1), as an editor shows it, so that a reported
    row can be found and fixed; items are numbered by data row (``item_id``), blank lines skipped.
    """
    # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark, which is not part of
    # the first column's name.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header: list[str] | None = None
        row_number = 0
        next_line = 1
        for cells in reader:
            # A quoted cell may span lines, so a row starts right after the previous one ended.
            line, next_line = next_line, reader.line_num + 1
            if line == 1 and "resident_code" in (names := [cell.strip() for cell in cells]):
                header = names
                continue
            if not cells:
                continue
            row_number += 1
            row = dict(zip(header, cells, strict=False)) if header else {"resident_code": cells[0]}
            try:
                yield line, _item(row_number, row)
            except BadRow as bad:
                yield line, bad


def _count_rows(path: Path) -> int:
    with path.open("rb") as handle:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    with path.open(encoding="utf-8-sig") as handle:
        has_header = "resident_code" in handle.readline()
    return max(lines - (1 if has_header else 0), 0)


def _date(value: common_pb2.Date) -> str:
    return f"{value.year:04d}-{value.month:02d}-{value.day:02d}" if value.year else ""


def _result_row(result: lookup_pb2.VerifyResult, code: str, line: int) -> list[str]:
    address = result.new_address
    return [
        str(result.item_id), code,
        lookup_pb2.VerifyStatus.Name(result.status).removeprefix("VERIFY_STATUS_"),
        result.new_resident_code,
        _date(result.death_date) if result.HasField("death_date") else "",
        f"{address.prefecture}{address.municipality}{address.street}" if result.HasField("new_address") else "",
        " ".join(common_pb2.Field.Name(f).removeprefix("FIELD_") for f in result.mismatched_fields),
        str(line),
    ]


def _rejection(result: lookup_pb2.VerifyResult, code: str) -> str:
    """Why the service did not verify a row, for people: the field, the value, the reason and its code."""
    violation = result.violation
    reason = common_pb2.ErrorReason.Name(violation.reason).removeprefix("ERROR_REASON_")
    return f"{violation.field or 'resident_code'} {code!r}: {violation.description} ({reason})"


async def verify_file(
    stub: lookup_pb2_grpc.LookupServiceStub, rows: Iterator[tuple[int, lookup_pb2.VerifyItem | BadRow]],
    out: TextIO, purpose: str, batch: int, progress: Progress | None = None, task: Any = None, sign: Any = None,
    report: Callable[[int, str], None] | None = None,
) -> dict[str, int]:
    """Stream the rows' items through VerifyBatch (HTTP/2 flow control paces it); write one result row per
    answered item; report each bad row with its line number (``report(line, why)``); count statuses, and
    bad rows under ``"bad_rows"``."""
    counts: dict[str, int] = {}
    # item_id -> (line in the file, resident code) of items sent and not yet answered.
    sent: dict[int, tuple[int, str]] = {}

    def bad(line: int, why: str) -> None:
        counts["bad_rows"] = counts.get("bad_rows", 0) + 1
        if report is not None:
            report(line, why)
        if progress is not None:
            progress.advance(task, 1)

    async def requests() -> AsyncIterator[lookup_pb2.VerifyBatchRequest]:
        first = True
        chunk: list[lookup_pb2.VerifyItem] = []
        for line, entry in rows:
            if isinstance(entry, BadRow):
                bad(line, str(entry))
                continue
            sent[entry.item_id] = (line, entry.resident_code)
            chunk.append(entry)
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
    call = stub.VerifyBatch(requests())
    async for response in call:
        answered = 0
        for result in response.results:
            line, code = sent.pop(result.item_id, (0, ""))
            if result.status == lookup_pb2.VERIFY_STATUS_INVALID:
                bad(line, _rejection(result, code))
                continue
            row = _result_row(result, code, line)
            counts[row[2]] = counts.get(row[2], 0) + 1
            writer.writerow(row)
            answered += 1
        if progress is not None:
            progress.advance(task, answered)
    return counts


async def cmd_verify(args: argparse.Namespace) -> int:
    need("rich", "cli", "juki verify")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not args.file.is_file():
        raise SettingsError(f"no such file: {args.file}")
    if not 1 <= args.batch <= 50_000:
        raise SettingsError("--batch must be between 1 and 50000")
    total = _count_rows(args.file)
    out = args.out.open("w", newline="", encoding="utf-8") if args.out else sys.stdout
    console = _stderr_console()
    try:
        async with MeshClient(args.data_dir, args.identity) as client:
            stub = lookup_pb2_grpc.LookupServiceStub(client.channel("lookup"))

            def sign(request: lookup_pb2.VerifyBatchRequest) -> None:
                _sign(client, request, "/juki.lookup.v1.LookupService/VerifyBatch", args.password)

            def report(line: int, why: str) -> None:
                console.print(f"line {line}: {why}", markup=False, highlight=False, soft_wrap=True)

            columns = (TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns, console=console, transient=args.out is None) as progress:
                task = progress.add_task("verify", total=total)
                counts = await verify_file(stub, read_items(args.file), out, args.purpose, args.batch,
                                           progress, task, sign, report)
    finally:
        if args.out:
            out.close()
    bad_rows = counts.pop("bad_rows", 0)
    print(json.dumps({"rows": sum(counts.values()) + bad_rows, **counts, "bad_rows": bad_rows}, ensure_ascii=False),
          file=sys.stderr)
    return EXIT_BAD_ROWS if bad_rows else EXIT_VERIFIED


def _stderr_console() -> Any:
    need("rich", "cli", "juki verify")
    from rich.console import Console

    return Console(stderr=True)
