"""BulkLoad: a municipality's whole register as identity records (initial load or re-sync).

Each batch is one transaction: records equal to the stored row are counted unchanged, others are
upserted with a new version, a history row and a change-feed row. A prefecture applies the load to its
own copy and then passes the same batches on to the national intake before answering, so an answered
load is durable at both tiers; a repeated load id is answered from the first load's summary.

A load is resumable. Each batch's transaction also advances the load's progress row (bulk_loads): while
the load arrives in ascending resident-code order, the highest code applied. After an interruption (any
of the three processes killed) the sender asks GetBulkLoad where to resume — at a prefecture, the lower
of its own progress and the national intake's — and sends the rest with the same load id; each tier
skips the records its progress already covers and passes the whole batch on, so nothing is applied or
counted twice and nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import grpc

from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki.intake.senders import check_sender
from juki.intake.store import BulkBatch, Store
from juki.mesh.errors import JukiError, Reason, invalid
from juki.mesh.settings import ServiceSettings
from juki.mesh.tls import Peer, require_peer, secure_channel

MAX_REJECTIONS = 100


def _violations(record: common_pb2.IdentityRecord, municipality_code: str) -> list[common_pb2.FieldViolation]:
    found: list[common_pb2.FieldViolation] = []

    def add(field: str, description: str, reason: int = common_pb2.ERROR_REASON_INVALID_FIELD) -> None:
        found.append(common_pb2.FieldViolation(field=field, description=description, reason=reason))  # type: ignore[arg-type]

    code = record.resident_code
    if not (len(code) == 11 and code.isdigit()):
        add("resident_code", "must be 11 digits")
    elif not domain.is_valid_resident_code(code):
        add("resident_code", "fails the check digit", common_pb2.ERROR_REASON_CHECK_DIGIT_MISMATCH)
    if record.address.municipality_code != municipality_code:
        add("address.municipality_code", f"must be the loaded municipality {municipality_code}")
    if record.resident_kind not in (common_pb2.RESIDENT_KIND_JAPANESE, common_pb2.RESIDENT_KIND_FOREIGN):
        add("resident_kind", "must be JAPANESE or FOREIGN")
    if record.sex not in (common_pb2.SEX_MALE, common_pb2.SEX_FEMALE):
        add("sex", "must be SEX_MALE or SEX_FEMALE")
    if not record.name.family_name:
        add("name.family_name", "must not be empty")
    if not 1800 <= record.birth_date.year <= 9999:
        add("birth_date.year", "must be a known year")
    if record.status == common_pb2.RESIDENT_STATUS_UNSPECIFIED or record.status not in common_pb2.ResidentStatus.values():
        add("status", "must be a known ResidentStatus")
    try:
        domain.normalise_name(record.name.family_name)
        domain.normalise_street(record.address.street)
    except domain.InvalidText as exc:
        add("name", f"not storable text: {exc}")
    return found


def _load_id_ok(load_id: str) -> bool:
    return 0 < len(load_id) <= 128 and load_id.isprintable()


def _date(value: common_pb2.Date) -> dt.date | None:
    try:
        return dt.date(value.year, value.month, value.day) if value.year and value.month and value.day else None
    except ValueError:
        return None


def _row(record: common_pb2.IdentityRecord) -> dict[str, Any]:
    """The ``residents`` row of a loaded record by column name, every column but ``version`` (the store's)."""
    name = record.name
    place = domain.municipality(record.address.municipality_code)
    return {
        "resident_code": record.resident_code, "resident_kind": record.resident_kind,
        "family_name": name.family_name, "given_name": name.given_name,
        "family_name_kana": name.family_name_kana, "given_name_kana": name.given_name_kana,
        "alphabetic_name": name.alphabetic_name, "common_name": name.common_name,
        "former_family_name": name.former_family_name,
        "birth_year": record.birth_date.year, "birth_month": record.birth_date.month,
        "birth_day": record.birth_date.day, "sex": record.sex,
        "municipality_code": record.address.municipality_code,
        "prefecture": place.prefecture_name if place else record.address.prefecture,
        "municipality": place.city_name if place else record.address.municipality,
        "street": record.address.street, "status": record.status,
        "last_change_kind": record.last_change_kind or common_pb2.CHANGE_KIND_EX_OFFICIO_ENTRY,
        "last_changed_on": _date(record.last_changed_on), "last_notified_on": _date(record.last_notified_on),
        "death_date": None, "successor_code": record.successor_code or None, "predecessor_code": None,
        "name_key": domain.match_key(name.family_name + name.given_name),
        "address_key": domain.address_key(record.address.street),
    }


async def bulk_load(
    store: Store, settings: ServiceSettings, requests: AsyncIterator[intake_pb2.BulkLoadRequest], *, national: bool
) -> intake_pb2.BulkLoadResponse:
    """Apply a load batch by batch (each one transaction in the store); a prefecture passes it on as it goes."""
    peer = require_peer()
    summary = intake_pb2.BulkLoadResponse()
    target = settings.peers.national_intake if not national else None
    forwarder = _Forwarder(target, settings.tls) if target else None
    try:
        return await _load(store, peer, summary, requests, forwarder,
                           national=national, prefecture=settings.prefecture or "")
    finally:
        if forwarder is not None:
            await forwarder.close()


async def _load(store: Store, peer: Peer, summary: intake_pb2.BulkLoadResponse,
                requests: AsyncIterator[intake_pb2.BulkLoadRequest], forwarder: _Forwarder | None,
                *, national: bool, prefecture: str) -> intake_pb2.BulkLoadResponse:
    through = 0
    replay = False
    stream_last = ""  # the highest code of this stream so far (in order: each batch starts above it)
    in_order = True
    more = False
    iterator = aiter(requests)
    while (request := await _next_batch(iterator, forwarder)) is not None:
        more = request.more_batches
        if not summary.load_id:
            if not _load_id_ok(request.load_id):
                raise invalid("load_id", "1..128 printable characters, the same on every batch")
            if not domain.is_municipality(request.municipality_code):
                raise invalid("municipality_code", "must be a listed municipality", Reason.UNKNOWN_MUNICIPALITY)
            check_sender(peer, {request.municipality_code}, national=national, prefecture=prefecture)
            if not national and request.municipality_code[:2] != prefecture:
                raise invalid("municipality_code", "not a municipality of this prefecture")
            summary.load_id, summary.municipality_code = request.load_id, request.municipality_code
            state = await store.bulk_load(request.load_id)
            if state is not None and state["municipality_code"] != request.municipality_code:
                raise invalid("load_id", "names a load of another municipality")
            replay = state is not None and state["finished_at"] is not None
        elif request.load_id != summary.load_id or request.municipality_code != summary.municipality_code:
            raise invalid("load_id", "every batch of a load carries the same load_id and municipality_code")
        through = max(through, request.through_sequence)
        if replay:
            summary.records_received += len(request.records)
            summary.records_unchanged += len(request.records)
            continue
        codes = [record.resident_code for record in request.records]
        in_order = in_order and all(a < b for a, b in zip([stream_last, *codes], codes, strict=False))
        if codes:
            stream_last = max(stream_last, *codes)
        await _apply_batch(store, request, summary, in_order)
        if forwarder is not None:
            await forwarder.put(request)  # passed on as applied: memory holds a few batches, not the load
    if not summary.load_id:
        raise invalid("load_id", "a load needs at least one batch")
    if more and not replay:
        # The stream ended after a batch that announced more: its sender was cut off (a dying client's
        # stream can end like a complete one). Not finished here, nor (the national stream is cancelled,
        # not closed) at the national intake: the load stays in progress, to be resumed.
        raise invalid("more_batches", "the stream ended before the load's last batch; the load stays in "
                      "progress: resume it after GetBulkLoad's last_resident_code")
    if replay:
        return summary
    if forwarder is not None:
        await forwarder.finish()
    totals = await store.finish_bulk_load(summary.load_id, summary.municipality_code, through)
    # The answer covers the whole load, every stream of it when it was resumed (each record once).
    summary.records_received = totals["records_received"]
    summary.records_applied = totals["records_applied"]
    summary.records_unchanged = totals["records_unchanged"]
    summary.records_rejected = totals["records_rejected"]
    return summary


def _settled(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as read (its outcome is handled where it matters)."""
    if not future.cancelled():
        future.exception()


async def _next_batch(iterator: AsyncIterator[intake_pb2.BulkLoadRequest], forwarder: _Forwarder | None
                      ) -> intake_pb2.BulkLoadRequest | None:
    """The next batch of the load (None at its end) — or, if the national stream ends first, its failure:
    a sender that waits for the load to progress before it sends more must not wait on a dead stream."""
    step: asyncio.Future[intake_pb2.BulkLoadRequest] = asyncio.ensure_future(anext(iterator))
    # Whatever the step ends with is read, even when this call is cancelled while it waits (a killed
    # client tears the stream down: the step then ends in StopAsyncIteration, which nobody would await).
    step.add_done_callback(_settled)
    upstream = forwarder.task if forwarder is not None else None
    try:
        if upstream is not None:
            racing: set[asyncio.Future[Any]] = {step, upstream}
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if upstream is None or step.done():
            return await step
    except StopAsyncIteration:
        return None
    except BaseException:
        step.cancel()
        raise
    step.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await step
    await upstream  # raises what ended it
    raise JukiError(Reason.DEPENDENCY_UNAVAILABLE, "the national intake ended the load early; send it again")


async def _apply_batch(store: Store, request: intake_pb2.BulkLoadRequest, summary: intake_pb2.BulkLoadResponse,
                       in_order: bool) -> None:
    valid: dict[str, dict[str, Any]] = {}
    refused: list[intake_pb2.BulkLoadRejection] = []
    for record in request.records:
        found = _violations(record, request.municipality_code)
        if found:
            refused.append(intake_pb2.BulkLoadRejection(resident_code=record.resident_code, violations=found))
            continue
        valid[record.resident_code] = _row(record)
    batch = BulkBatch(load_id=request.load_id, municipality_code=request.municipality_code,
                      through=request.through_sequence, codes=[r.resident_code for r in request.records],
                      rejected=[r.resident_code for r in refused], in_order=in_order)
    counts = await store.apply_bulk(valid, batch)
    skip = counts.skipped_through
    for rejection in refused:
        if rejection.resident_code > skip and len(summary.rejections) < MAX_REJECTIONS:
            summary.rejections.append(rejection)
    summary.records_received += counts.received
    summary.records_rejected += counts.rejected
    summary.records_applied += counts.applied
    summary.records_unchanged += counts.unchanged


async def get_bulk_load(store: Store, settings: ServiceSettings, request: intake_pb2.GetBulkLoadRequest,
                        *, national: bool) -> intake_pb2.GetBulkLoadResponse:
    """Where a load stands here; at a prefecture, resumable only as far as the national intake has it too."""
    peer = require_peer()
    if not _load_id_ok(request.load_id):
        raise invalid("load_id", "1..128 printable characters")
    code = request.municipality_code
    if not domain.is_municipality(code):
        raise invalid("municipality_code", "must be a listed municipality", Reason.UNKNOWN_MUNICIPALITY)
    prefecture = settings.prefecture or ""
    check_sender(peer, {code}, national=national, prefecture=prefecture)
    if not national and code[:2] != prefecture:
        raise invalid("municipality_code", "not a municipality of this prefecture")
    answer = intake_pb2.GetBulkLoadResponse(load_id=request.load_id, municipality_code=code,
                                            state=intake_pb2.BULK_LOAD_STATE_NOT_STARTED)
    row = await store.bulk_load(request.load_id)
    if row is None:
        return answer
    if row["municipality_code"] != code:
        # Deny by default: a load id of another municipality is not the caller's to read.
        raise JukiError(Reason.PEER_NOT_AUTHORISED, "the load is not one of this municipality's")
    finished = row["finished_at"] is not None
    answer.state = intake_pb2.BULK_LOAD_STATE_FINISHED if finished else intake_pb2.BULK_LOAD_STATE_IN_PROGRESS
    answer.last_resident_code = row["last_resident_code"] if row["in_order"] else ""
    answer.through_sequence = row["through_sequence"]
    answer.records_received = row["records_received"]
    answer.records_applied = row["records_applied"]
    answer.records_unchanged = row["records_unchanged"]
    answer.records_rejected = row["records_rejected"]
    target = settings.peers.national_intake
    if not national and not finished and answer.last_resident_code and target:
        upper = await _national_progress(target, settings.tls, request)
        if upper.state != intake_pb2.BULK_LOAD_STATE_FINISHED:
            answer.last_resident_code = min(answer.last_resident_code, upper.last_resident_code)
    return answer


async def _national_progress(target: str, tls: Any, request: intake_pb2.GetBulkLoadRequest
                             ) -> intake_pb2.GetBulkLoadResponse:
    try:
        async with secure_channel(target, tls) as channel:
            upper: intake_pb2.GetBulkLoadResponse = await intake_pb2_grpc.IntakeServiceStub(channel).GetBulkLoad(
                request, timeout=10)
            return upper
    except grpc.aio.AioRpcError as exc:
        raise JukiError(Reason.DEPENDENCY_UNAVAILABLE,
                        f"the national intake did not say how far it has the load: {exc.details()}",
                        retry_after_seconds=5) from exc


FORWARD_WINDOW = 4  # batches applied here and not yet taken by the national intake's stream
# A national load takes hours, not minutes: the stream's deadline only guards against one that hangs
# (a dead peer ends it at once; an interrupted load resumes where it stopped).
LOAD_DEADLINE_SECONDS = 24 * 3600


class _Forwarder:
    """A prefecture's load passed on to the national intake batch by batch, on one stream, as it is applied.

    The queue between the two is bounded, so a load of millions of records holds at most FORWARD_WINDOW
    batches in memory (it used to hold the whole load until the end); a slow national intake slows the
    load down instead. The answer waits for the national intake's own answer, so an answered load is
    durable at both tiers; a load that failed on the way can be sent again (nothing changes twice).
    """

    def __init__(self, target: str, tls: Any) -> None:
        self._target = target
        self._tls = tls
        self._queue: asyncio.Queue[intake_pb2.BulkLoadRequest | None] = asyncio.Queue(maxsize=FORWARD_WINDOW)
        self._task: asyncio.Task[intake_pb2.BulkLoadResponse] | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def task(self) -> asyncio.Task[intake_pb2.BulkLoadResponse] | None:
        """The national stream once the first batch was passed on (done: it ended, early or not)."""
        return self._task

    async def _batches(self) -> AsyncIterator[intake_pb2.BulkLoadRequest]:
        while (request := await self._queue.get()) is not None:
            yield request

    async def put(self, request: intake_pb2.BulkLoadRequest) -> None:
        if self._task is None:
            self._channel = secure_channel(self._target, self._tls)
            stub = intake_pb2_grpc.IntakeServiceStub(self._channel)
            self._task = asyncio.create_task(_national(stub.BulkLoad(self._batches(), timeout=LOAD_DEADLINE_SECONDS)))
        put = asyncio.create_task(self._queue.put(request))
        # Wait for room in the queue, or for the national stream to end early (its failure is the answer).
        await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            await self._task  # raises what ended it
            raise JukiError(Reason.DEPENDENCY_UNAVAILABLE, "the national intake ended the load early; send it again")

    async def finish(self) -> None:
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task

    async def close(self) -> None:
        if self._task is not None:
            if not self._task.done():
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task  # collects its outcome, whatever it was (never left unretrieved)
        if self._channel is not None:
            await self._channel.close()


async def _national(call: Any) -> intake_pb2.BulkLoadResponse:
    try:
        response: intake_pb2.BulkLoadResponse = await call
        return response
    except grpc.aio.AioRpcError as exc:
        raise JukiError(Reason.DEPENDENCY_UNAVAILABLE,
                        f"loaded here, but the national intake did not take the load: {exc.details()}; "
                        "send it again (a repeated load changes nothing here)",
                        retry_after_seconds=5) from exc
