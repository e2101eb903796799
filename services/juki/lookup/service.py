"""The LookupService servicer: requests -> authorisation -> store -> filtered records -> durable log.

Order of every query, fixed here once: (1) a caller that is not a public body is refused before
anything else; (2) the request names its 事務 and the 別表 policy must grant it for this query mode;
(3) the recipient's quota; (4) the request's own fields are validated; (5) the store is read; (6) the
records are filtered to the granted fields; (7) their provision records are made durable in the access
log; (8) only then does the answer leave.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as _dt
import logging
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from opentelemetry import trace

from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki.domain.codes import is_valid_resident_code
from juki.domain.names import InvalidText, address_key, match_key
from juki.domain.policy import (
    FieldNotGranted,
    Grant,
    IdentityField,
    ModeNotGranted,
    NotAPublicBody,
    Policy,
    PolicyError,
    PurposeNotGranted,
    QueryMode,
)
from juki.lookup import records as rec
from juki.lookup.provisions import ProvisionLog
from juki.lookup.quota import Quotas
from juki.lookup.records import RecordEncoder
from juki.mesh import wire
from juki.mesh.errors import FieldViolation, JukiError, Reason, invalid, invalid_many
from juki.mesh.operator import OperatorVerifier
from juki.mesh.pagination import decode_token, encode_token, page_size
from juki.mesh.telemetry import current_trace_id
from juki.mesh.tls import Peer, require_peer

log = logging.getLogger(__name__)

MAX_VERIFY_ITEMS = 50_000
# Messages of one VerifyBatch stream being answered at once (see VerifyBatch).
VERIFY_PIPELINE = 3
DEFAULT_MAX_CHANGES = 500
MAX_CHANGES = 10_000
STREAM_POLL_SECONDS = 0.2

_FIELDS_BY_CODE = f"SELECT {rec.RECORD_COLUMNS} FROM {rec.RECORD_FROM} WHERE r.resident_code = $1"
_FIELDS_BY_CODES = f"SELECT {rec.RECORD_COLUMNS} FROM {rec.RECORD_FROM} WHERE r.resident_code = ANY($1::text[])"
# name_key is the intake's normalised name; rows written without one ('') are matched in Python.
_FOUR_ITEMS = (
    f"SELECT {rec.RECORD_COLUMNS} FROM {rec.RECORD_FROM}"
    " WHERE r.name_key IN ($1, '') AND r.birth_year = $2 AND r.birth_month = $3 AND r.birth_day = $4"
    " AND r.sex = $5 LIMIT 1000"
)
_CHANGES = (
    f"SELECT c.change_id, c.resident_code AS changed_code, c.change_kind, c.occurred_on, {rec.RECORD_COLUMNS}"
    f" FROM {rec.NATIONAL_SCHEMA}.resident_changes c JOIN watches w ON w.resident_code = c.resident_code"
    " AND w.recipient = $1 AND w.purpose = $2"
    f" LEFT JOIN {rec.RECORD_FROM} ON r.resident_code = c.resident_code"
    " WHERE c.change_id > $3 ORDER BY c.change_id LIMIT $4"
)

_MOVE_KINDS = frozenset({
    common_pb2.CHANGE_KIND_MOVE_IN, common_pb2.CHANGE_KIND_SPECIAL_MOVE_IN, common_pb2.CHANGE_KIND_ADDRESS_CHANGE,
})

_POLICY_REASONS: dict[type[PolicyError], Reason] = {
    NotAPublicBody: Reason.NOT_A_PUBLIC_BODY,
    PurposeNotGranted: Reason.PURPOSE_NOT_GRANTED,
    ModeNotGranted: Reason.MODE_NOT_GRANTED,
    FieldNotGranted: Reason.FIELD_NOT_GRANTED,
}

# Tags of the messages this servicer writes as bytes (see ``mesh.wire``).
_PROVISION = wire.tags(accesslog_pb2.ProvisionRecord)
_VERIFY_RESULT = wire.tags(lookup_pb2.VerifyResult)
_VERIFY_RESPONSE = wire.tags(lookup_pb2.VerifyBatchResponse)

_TRACER = trace.get_tracer("juki.lookup")
_STORE_SPAN = {"db.system": "postgresql", "db.operation": "SELECT", "db.sql.table": "intake_national.residents"}


@dataclass(frozen=True)
class Attempt:
    """What the current call asked for, so that a refusal can be logged with it."""

    purpose: str
    mode: QueryMode
    resident_code: str = ""
    operator_id: str = ""


current_attempt: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("juki_lookup_attempt", default=None)


def _policy_error(error: PolicyError) -> JukiError:
    for kind, reason in _POLICY_REASONS.items():
        if isinstance(error, kind):
            violations = []
            if isinstance(error, FieldNotGranted):
                violations = [FieldViolation("requested_fields", str(error), reason.name)]
            return JukiError(reason, str(error), violations=violations)
    return JukiError(Reason.PURPOSE_NOT_GRANTED, str(error))


# What is wrong with a malformed resident code: the catalogued reason and a sentence for people. A whole
# call is refused with them; a VerifyBatch item gets them in its own result (lookup_pb2.ItemViolation).
_CODE_DEFECTS: dict[int, tuple[Reason, str]] = {
    lookup_pb2.RESIDENT_CODE_DEFECT_MISSING: (Reason.INVALID_FIELD, "a resident code (住民票コード) is required"),
    lookup_pb2.RESIDENT_CODE_DEFECT_CHARACTERS: (
        Reason.INVALID_FIELD, "a resident code holds the ASCII digits 0-9 only"),
    lookup_pb2.RESIDENT_CODE_DEFECT_LENGTH: (Reason.INVALID_FIELD, "a resident code has 11 digits"),
    lookup_pb2.RESIDENT_CODE_DEFECT_CHECK_DIGIT: (Reason.CHECK_DIGIT_MISMATCH, "the check digit does not match"),
}


def code_defect(code: str) -> int:
    """The ``ResidentCodeDefect`` of ``code``; RESIDENT_CODE_DEFECT_UNSPECIFIED (0) when it is well formed."""
    if not code:
        return lookup_pb2.RESIDENT_CODE_DEFECT_MISSING
    if not code.isascii() or not code.isdigit():
        return lookup_pb2.RESIDENT_CODE_DEFECT_CHARACTERS
    if len(code) != 11:
        return lookup_pb2.RESIDENT_CODE_DEFECT_LENGTH
    if not is_valid_resident_code(code):
        return lookup_pb2.RESIDENT_CODE_DEFECT_CHECK_DIGIT
    return lookup_pb2.RESIDENT_CODE_DEFECT_UNSPECIFIED


def _check_code(code: str, field: str) -> None:
    defect = code_defect(code)
    if defect:
        reason, description = _CODE_DEFECTS[defect]
        raise invalid(field, description, reason)


def _code_violation(code: str, field: str) -> FieldViolation | None:
    try:
        _check_code(code, field)
    except JukiError as error:
        return error.violations[0]
    return None


class Authorised:
    """A granted call: who asks, for which 事務 and mode, and which fields it receives."""

    __slots__ = ("fields", "grant", "operator_id", "peer", "proto_fields", "template")

    def __init__(self, peer: Peer, grant: Grant, fields: frozenset[IdentityField], provider: str,
                 operator_id: str) -> None:
        self.peer = peer
        self.grant = grant
        self.fields = fields
        self.operator_id = operator_id
        self.proto_fields = rec.proto_fields(fields)
        # Everything but the resident code, the time and the fields is the same for every record of
        # this call, so each record is written as template bytes plus its own fields.
        self.template = accesslog_pb2.ProvisionRecord(
            recipient=peer.spiffe_id,
            recipient_name=grant.agency.name,
            purpose=grant.purpose.code,
            purpose_name=grant.purpose.name,
            query_mode=rec.MODE_TO_PROTO[grant.mode],
            provider_tier=common_pb2.TIER_NATIONAL,
            provider=provider,
            outcome=accesslog_pb2.PROVISION_OUTCOME_PROVIDED,
            trace_id=current_trace_id() or "",
            operator_id=operator_id,
        )

    def record_templates(self) -> tuple[bytes, bytes]:
        """Serialised provision records stamped now, without a resident code: (with the fields, without).

        Protobuf allows fields in any order, so one provision record is a template followed by its
        resident code (field 10); the access log re-serialises deterministically before hashing.
        """
        stamped = accesslog_pb2.ProvisionRecord()
        stamped.CopyFrom(self.template)
        stamped.provided_at.GetCurrentTime()
        without_fields = stamped.SerializeToString()
        stamped.fields.extend(self.proto_fields)
        return stamped.SerializeToString(), without_fields

    def refusal(self, reason: Reason) -> bytes:
        """A serialised REFUSED provision record of this call, stamped now, naming no resident.

        It is what a malformed item of a batch leaves in the access log: the attempt is on record, but a
        code that is not a 住民票コード names nobody (and the log keeps only well-formed codes).
        """
        refused = accesslog_pb2.ProvisionRecord()
        refused.CopyFrom(self.template)
        refused.provided_at.GetCurrentTime()
        refused.outcome = accesslog_pb2.PROVISION_OUTCOME_REFUSED
        refused.refusal_reason = common_pb2.ErrorReason.Value(f"ERROR_REASON_{reason.name}")
        return refused.SerializeToString()

    def provisions(self, items: Iterable[tuple[str, bool]]) -> list[bytes]:
        """Serialised provision records, one per (resident code, whether the granted fields were provided)."""
        with_fields, without_fields = self.record_templates()
        return [(with_fields if provided else without_fields) + code_field(code) for code, provided in items]


def code_field(code: str) -> bytes:
    """Field 10 (resident_code) of a ProvisionRecord."""
    return wire.text(_PROVISION["resident_code"], code)


class LookupServicer(lookup_pb2_grpc.LookupServiceServicer):
    """Thin servicer: each RPC validates, authorises, reads, filters, logs and answers."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        policy: Policy,
        provisions: ProvisionLog,
        quotas: Quotas,
        provider: str,
        operators: OperatorVerifier,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._provisions = provisions
        self._quotas = quotas
        self._provider = provider
        self._operators = operators

    # -- authorisation ---------------------------------------------------------------------------------

    async def _authorise(
        self,
        purpose: str,
        mode: QueryMode,
        requested: Iterable[int],
        request: Any,
        resident_code: str = "",
    ) -> Authorised:
        """Steps (1)-(3) of every query, then the operator proof the method table asks for (mesh.methods)."""
        peer = require_peer()
        current_attempt.set(Attempt(purpose, mode, resident_code))
        if not peer.is_public_body or peer.kind == "private":
            raise JukiError(Reason.NOT_A_PUBLIC_BODY, f"{peer.spiffe_id} is not a public body")
        if not purpose:
            raise invalid("purpose", "the 事務 (purpose) code is required")
        try:
            grant = self._policy.authorise(peer.spiffe_id, purpose, mode)
        except PolicyError as error:
            raise _policy_error(error) from None
        await self._quotas.take(peer.spiffe_id, grant.agency.quota_per_second)
        operator = await self._operators.check(request)
        operator_id = operator.operator_id if operator is not None else ""
        if operator_id:
            current_attempt.set(Attempt(purpose, mode, resident_code, operator_id))
        wanted = list(requested)
        if wanted:
            unknown = [i for i, number in enumerate(wanted) if number not in rec.PROTO_TO_FIELD]
            if unknown:
                raise invalid(f"requested_fields[{unknown[0]}]", "not a known field")
            try:
                fields = grant.require_fields(rec.PROTO_TO_FIELD[number] for number in wanted)  # type: ignore[index]
            except PolicyError as error:
                raise _policy_error(error) from None
        else:
            fields = grant.fields
        return Authorised(peer, grant, fields, self._provider, operator_id)

    # -- by code -----------------------------------------------------------------------------------------

    async def LookupByCode(
        self, request: lookup_pb2.LookupByCodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lookup_pb2.LookupByCodeResponse:
        call = await self._authorise(
            request.purpose, QueryMode.BY_CODE, request.requested_fields, request, request.resident_code,
        )
        _check_code(request.resident_code, "resident_code")
        with _TRACER.start_as_current_span("identity_store.read", attributes=_STORE_SPAN):
            row = await self._pool.fetchrow(_FIELDS_BY_CODE, request.resident_code)
        if row is None:
            raise JukiError(Reason.RESIDENT_NOT_FOUND, f"no resident has code {request.resident_code}")
        record = rec.identity_record(row, call.fields)
        # The answer leaves only once its provision record is durable in the access log.
        with _TRACER.start_as_current_span("access_log.provision_durable"):
            await self._provisions.record(call.provisions([(request.resident_code, True)]))
        return lookup_pb2.LookupByCodeResponse(record=record, provided_fields=call.proto_fields)

    # -- by four items -------------------------------------------------------------------------------------

    async def SearchByFourItems(
        self, request: lookup_pb2.SearchByFourItemsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lookup_pb2.SearchByFourItemsResponse:
        call = await self._authorise(request.purpose, QueryMode.BY_FOUR_ITEMS, request.requested_fields, request)
        violations: list[FieldViolation] = []
        name_key = address = ""
        try:
            name_key = match_key(request.name)
        except InvalidText as error:
            violations.append(FieldViolation("name", str(error)))
        if not name_key and not violations:
            violations.append(FieldViolation("name", "the name (氏名) is required"))
        birth = request.birth_date
        if not request.HasField("birth_date") or not birth.year:
            violations.append(FieldViolation("birth_date", "the birth date (生年月日) is required"))
        elif not 1 <= birth.month <= 12 and birth.month != 0:
            violations.append(FieldViolation("birth_date.month", "month must be 1-12, or 0 when unknown"))
        elif not 0 <= birth.day <= 31:
            violations.append(FieldViolation("birth_date.day", "day must be 1-31, or 0 when unknown"))
        elif birth.month and birth.day:
            try:
                _dt.date(birth.year, birth.month, birth.day)
            except ValueError:
                violations.append(FieldViolation("birth_date", "not a calendar date"))
        if request.sex not in (common_pb2.SEX_MALE, common_pb2.SEX_FEMALE):
            violations.append(FieldViolation("sex", "the sex (性別) is required"))
        if request.address:
            try:
                address = address_key(request.address)
            except InvalidText as error:
                violations.append(FieldViolation("address", str(error)))
        if violations:
            raise invalid_many(violations)
        rows = await self._pool.fetch(_FOUR_ITEMS, name_key, birth.year, birth.month, birth.day, request.sex)
        matches = [row for row in rows if _name_matches(row, name_key)]
        if address:
            matches = [row for row in matches if _address_matches(row, address)]
        matches.sort(key=lambda row: (row["status"] != rec.RESIDENT_STATUS_CURRENT, row["resident_code"]))
        candidates = [rec.identity_record(row, call.fields) for row in matches]
        await self._provisions.record(call.provisions((row["resident_code"], True) for row in matches))
        return lookup_pb2.SearchByFourItemsResponse(candidates=candidates, provided_fields=call.proto_fields)

    # -- batch verification -------------------------------------------------------------------------------

    async def VerifyBatch(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[lookup_pb2.VerifyBatchRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        """Yields serialised VerifyBatchResponses (the binding's serializer passes bytes through)."""
        iterator = request_iterator.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            return
        call = await self._authorise(first.purpose, QueryMode.BATCH_VERIFY, first.requested_fields, first)
        # Messages are verified in a short pipeline: while one waits for the store or for the access
        # log's acknowledgement, the next is already being read and answered. Answers leave in order.
        answers: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue(VERIFY_PIPELINE)
        loop = asyncio.get_running_loop()
        # Every task this stream starts, until it is done: when the stream ends early (an error, or the
        # client going away) each is cancelled, wherever it is - in the queue, awaited, or just created
        # by the reader while the queue was full - and none is left running or holding an exception.
        running: set[asyncio.Task[Any]] = set()

        def start(work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
            task = loop.create_task(work)
            running.add(task)
            task.add_done_callback(_settled)
            return task

        def _settled(task: asyncio.Task[Any]) -> None:
            running.discard(task)
            # Collected here; the failure that matters reaches the caller through the answer loop.
            if not task.cancelled():
                task.exception()

        async def read() -> None:
            # Items are numbered across the whole stream, so that a bad item's result can say where it
            # stands in the caller's file and not only in its message.
            offset = len(first.items)
            torn_down = False
            try:
                await answers.put(start(self._verify(call, first.items, 0)))
                async for request in iterator:
                    if request.purpose and request.purpose != call.grant.purpose.code:
                        raise invalid("purpose", "the purpose of a VerifyBatch stream cannot change")
                    await self._quotas.take(call.peer.spiffe_id, call.grant.agency.quota_per_second)
                    await answers.put(start(self._verify(call, request.items, offset)))
                    offset += len(request.items)
            except asyncio.CancelledError:
                torn_down = True
                raise
            finally:
                # The end marker, for the answer loop; a stream being torn down has no answer loop left,
                # and waiting for room in a full queue would leave this task pending forever.
                if not torn_down:
                    await answers.put(None)

        reader = start(read())
        try:
            while (task := await answers.get()) is not None:
                yield await task
            await reader
        finally:
            for task in list(running):
                task.cancel()

    async def _verify(self, call: Authorised, items: Sequence[lookup_pb2.VerifyItem], offset: int) -> bytes:
        """One VerifyBatchResponse, serialised: records are written as bytes (``RecordEncoder``).

        A malformed item gets a VERIFY_STATUS_INVALID result and a REFUSED record in the access log (in
        the same durable batch as the others' provisions); it does not end the stream, since one typing
        error in a pension file of millions is not a reason to stop verifying the rest.
        """
        if len(items) > MAX_VERIFY_ITEMS:
            raise invalid("items", f"at most {MAX_VERIFY_ITEMS} items per message")
        # Only codes of the right shape reach the store: an item may hold anything, even a NUL byte that
        # PostgreSQL cannot take as text and would fail the whole message with.
        codes = [code for item in items if len(code := item.resident_code) == 11 and code.isdigit()]
        rows = {row["resident_code"]: row for row in await self._pool.fetch(_FIELDS_BY_CODES, codes)}
        encoder = RecordEncoder(call.fields)
        with_fields, without_fields = call.record_templates()
        refusals: dict[Reason, bytes] = {}
        refused = 0
        parts: list[bytes] = []
        provided: list[bytes] = []
        for index, item in enumerate(items):
            code = item.resident_code
            row = rows.get(code)
            # Codes found in the store are valid by construction; only the others need the check digit.
            if row is None and (defect := code_defect(code)):
                reason, description = _CODE_DEFECTS[defect]
                result = _invalid_result(item, defect, reason, description, offset + index)
                if reason not in refusals:
                    refusals[reason] = call.refusal(reason)
                provided.append(refusals[reason])
                refused += 1
            else:
                result = _verify_one(item, row, encoder)
                # Every item is logged; a code the store does not know was asked about but got no fields.
                provided.append((with_fields if row is not None else without_fields) + code_field(code))
            parts.append(wire.length_delimited(_VERIFY_RESPONSE["results"], result))
        if refused:
            log.info("VerifyBatch from %s: %d of %d items refused as malformed", call.peer.spiffe_id, refused,
                     len(items))
        await self._provisions.record(provided)
        return b"".join(parts)

    # -- change feed -------------------------------------------------------------------------------------

    async def RegisterWatch(
        self, request: lookup_pb2.RegisterWatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lookup_pb2.RegisterWatchResponse:
        call = await self._authorise(request.purpose, QueryMode.CHANGE_FEED, (), request)
        codes = list(request.resident_codes)
        if not codes:
            raise invalid("resident_codes", "at least one resident code is required")
        if len(codes) > MAX_VERIFY_ITEMS:
            raise invalid("resident_codes", f"at most {MAX_VERIFY_ITEMS} codes per request")
        violations = [v for i, code in enumerate(codes) if (v := _code_violation(code, f"resident_codes[{i}]"))]
        if violations:
            raise invalid_many(violations[:100])
        async with self._pool.acquire() as connection, connection.transaction():
            status = await connection.execute(
                "INSERT INTO watches (recipient, purpose, resident_code)"
                " SELECT $1, $2, unnest($3::text[]) ON CONFLICT DO NOTHING",
                call.peer.spiffe_id, call.grant.purpose.code, codes,
            )
            total = await connection.fetchval(
                "SELECT count(*) FROM watches WHERE recipient = $1 AND purpose = $2",
                call.peer.spiffe_id, call.grant.purpose.code,
            )
        return lookup_pb2.RegisterWatchResponse(registered_count=int(status.rsplit(" ", 1)[1]), watched_count=total)

    async def _changes(self, call: Authorised, after: int, limit: int) -> tuple[list[lookup_pb2.ChangeEvent], int]:
        rows = await self._pool.fetch(_CHANGES, call.peer.spiffe_id, call.grant.purpose.code, after, limit)
        events = []
        logged: list[tuple[str, bool]] = []
        for row in rows:
            event = lookup_pb2.ChangeEvent(
                resident_code=row["changed_code"], change_kind=row["change_kind"], cursor=str(row["change_id"]),
                page_token=_feed_token(call, row["change_id"]),
            )
            occurred = rec.date_message(row["occurred_on"])
            if occurred is not None:
                event.occurred_on.CopyFrom(occurred)
            if row["resident_code"] is not None:
                event.record.CopyFrom(rec.identity_record(row, call.fields))
                notified = rec.date_message(row["last_notified_on"])
                if notified is not None:
                    event.notified_on.CopyFrom(notified)
                logged.append((row["changed_code"], True))
            events.append(event)
        await self._provisions.record(call.provisions(logged))
        return events, (rows[-1]["change_id"] if rows else after)

    async def ListChanges(
        self, request: lookup_pb2.ListChangesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lookup_pb2.ListChangesResponse:
        call = await self._authorise(request.purpose, QueryMode.CHANGE_FEED, (), request)
        after = _feed_position(call, request)
        if request.page_size:
            limit = page_size(request.page_size, DEFAULT_MAX_CHANGES, MAX_CHANGES)
        else:  # the deprecated field, for clients written before page_size
            limit = page_size(request.max_changes, DEFAULT_MAX_CHANGES, MAX_CHANGES, "max_changes")
        events, last = await self._changes(call, after, limit)
        return lookup_pb2.ListChangesResponse(
            changes=events, next_page_token=_feed_token(call, last), next_cursor=str(last) if last else "",
        )

    async def StreamChanges(
        self, request: lookup_pb2.StreamChangesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[lookup_pb2.StreamChangesResponse]:
        call = await self._authorise(request.purpose, QueryMode.CHANGE_FEED, (), request)
        after = _feed_position(call, request)
        while True:
            events, after = await self._changes(call, after, DEFAULT_MAX_CHANGES)
            if events:
                yield lookup_pb2.StreamChangesResponse(
                    changes=events, next_cursor=str(after), next_page_token=_feed_token(call, after))
            else:
                await asyncio.sleep(STREAM_POLL_SECONDS)

    # -- grants ------------------------------------------------------------------------------------------

    async def ListPurposes(
        self, request: lookup_pb2.ListPurposesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lookup_pb2.ListPurposesResponse:
        peer = require_peer()
        agency = self._policy.agency(peer.spiffe_id)
        if peer.kind == "private" or agency is None or not agency.public_body:
            raise JukiError(Reason.NOT_A_PUBLIC_BODY, f"{peer.spiffe_id} is not a public body")
        response = lookup_pb2.ListPurposesResponse(recipient=peer.spiffe_id, recipient_name=agency.name)
        for code in sorted(agency.purposes):
            purpose = agency.purposes[code]
            response.grants.add(
                purpose=purpose.code,
                name=purpose.name,
                legal_basis=f"住基法 {purpose.schedule_row}",
                query_modes=sorted(rec.MODE_TO_PROTO[mode] for mode in purpose.modes),
                fields=rec.proto_fields(purpose.fields),
            )
        return response


def _parse_cursor(cursor: str) -> int:
    """The deprecated cursor: the change id as decimal digits."""
    if not cursor:
        return 0
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 18:
        raise invalid("cursor", "not a cursor returned by this service")
    return int(cursor)


def _feed_scope(call: Authorised) -> str:
    """A change feed is the caller's under one 事務: a token of another feed is refused."""
    return f"{call.peer.spiffe_id}\n{call.grant.purpose.code}"


def _feed_token(call: Authorised, change_id: int) -> str:
    return encode_token("changes", _feed_scope(call), [change_id])


def _feed_position(call: Authorised, request: lookup_pb2.ListChangesRequest | lookup_pb2.StreamChangesRequest) -> int:
    """The change id a feed request continues after: its page token, or the deprecated cursor."""
    if request.page_token:
        if request.cursor:
            raise invalid("cursor", "set page_token or the deprecated cursor, not both")
        position = decode_token(request.page_token, "changes", _feed_scope(call))
        if len(position) != 1 or type(position[0]) is not int or position[0] < 0:
            raise invalid("page_token", "not a page token returned by this method for this request")
        return position[0]
    return _parse_cursor(request.cursor)


def _name_matches(row: Mapping[str, Any], key: str) -> bool:
    given = row["given_name"]
    candidates = (
        row["family_name"] + given,
        row["former_family_name"] + given if row["former_family_name"] else "",
        row["common_name"],
        row["alphabetic_name"],
        row["family_name_kana"] + row["given_name_kana"],
    )
    return any(text and match_key(text) == key for text in candidates)


def _address_matches(row: Mapping[str, Any], key: str) -> bool:
    street = row["street"]
    forms = (street, row["municipality"] + street, row["prefecture"] + row["municipality"] + street)
    return any(address_key(form) == key for form in forms if form)


def _invalid_result(item: lookup_pb2.VerifyItem, defect: int, reason: Reason, description: str,
                    stream_index: int) -> bytes:
    """The serialised VerifyResult of a malformed item: why it was not verified, and where it stands."""
    return lookup_pb2.VerifyResult(
        item_id=item.item_id,
        status=lookup_pb2.VERIFY_STATUS_INVALID,
        violation=lookup_pb2.ItemViolation(
            field="resident_code",
            reason=common_pb2.ErrorReason.Value(f"ERROR_REASON_{reason.name}"),
            defect=defect,  # type: ignore[arg-type]
            description=description,
            stream_index=stream_index,
        ),
    ).SerializeToString()


def _verify_one(item: lookup_pb2.VerifyItem, row: Mapping[str, Any] | None, encoder: RecordEncoder) -> bytes:
    """The serialised VerifyResult of one item (identity information is provided when ``row`` exists)."""
    head = wire.number(_VERIFY_RESULT["item_id"], item.item_id)
    if row is None:
        return head + _STATUS_NOT_FOUND
    record = encoder.encode(row)
    record_part = wire.length_delimited(_VERIFY_RESULT["record"], record)
    fields = encoder.fields
    status = row["status"]
    if status == rec.RESIDENT_STATUS_CURRENT and row["last_change_kind"] not in _MOVE_KINDS and not (
        item.HasField("expected_name") or item.HasField("expected_birth_date")
    ):
        return head + _STATUS_CURRENT + record_part  # the common case, without a message
    result = lookup_pb2.VerifyResult()
    if status == rec.RESIDENT_STATUS_CODE_RETIRED:
        result.status = lookup_pb2.VERIFY_STATUS_CODE_CHANGED
        if IdentityField.RESIDENT_CODE in fields and row["successor_code"]:
            result.new_resident_code = row["successor_code"]
    elif status == rec.RESIDENT_STATUS_DECEASED:
        result.status = lookup_pb2.VERIFY_STATUS_DECEASED
        death: _dt.date | None = row["death_date"] or row["last_changed_on"]
        death_message = rec.date_message(death)
        if death_message is not None:
            result.death_date.CopyFrom(death_message)
    elif mismatched := _mismatches(item, row):
        result.status = lookup_pb2.VERIFY_STATUS_MISMATCH
        result.mismatched_fields.extend(mismatched)
    elif (status in (rec.RESIDENT_STATUS_MOVED_OUT, rec.RESIDENT_STATUS_DELETED)
          or row["last_change_kind"] in _MOVE_KINDS):
        result.status = lookup_pb2.VERIFY_STATUS_MOVED
        if IdentityField.ADDRESS in fields:
            result.new_address.CopyFrom(rec.address_message(row))
    else:
        result.status = lookup_pb2.VERIFY_STATUS_CURRENT
    # Protobuf merges concatenated fields: the message's fields, then the record (field 3).
    return head + result.SerializeToString() + record_part


_STATUS_CURRENT = wire.number(_VERIFY_RESULT["status"], lookup_pb2.VERIFY_STATUS_CURRENT)
_STATUS_NOT_FOUND = wire.number(_VERIFY_RESULT["status"], lookup_pb2.VERIFY_STATUS_NOT_FOUND)


def _mismatches(item: lookup_pb2.VerifyItem, row: Mapping[str, Any]) -> list[rec.FieldNumber]:
    out: list[rec.FieldNumber] = []
    if item.HasField("expected_name"):
        name = item.expected_name
        pairs = (
            (name.family_name, row["family_name"]), (name.given_name, row["given_name"]),
            (name.family_name_kana, row["family_name_kana"]), (name.given_name_kana, row["given_name_kana"]),
        )
        try:
            if any(expected and match_key(expected) != match_key(actual) for expected, actual in pairs):
                out.append(common_pb2.FIELD_NAME)
        except InvalidText:
            out.append(common_pb2.FIELD_NAME)
    if item.HasField("expected_birth_date"):
        birth = item.expected_birth_date
        if (birth.year, birth.month, birth.day) != (row["birth_year"], row["birth_month"], row["birth_day"]):
            out.append(common_pb2.FIELD_BIRTH_DATE)
    return out
