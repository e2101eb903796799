"""BulkLoad: a municipality's whole register as identity records (initial load or re-sync).

Each batch is one transaction: records equal to the stored row are counted unchanged, others are
upserted with a new version, a history row and a change-feed row. A prefecture applies the load to its
own copy and then passes the same batches on to the national intake before answering, so an answered
load is durable at both tiers; a repeated load id is answered from the first load's summary.
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
from juki.intake.store import Store
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
    async for request in requests:
        if not summary.load_id:
            if not request.load_id or len(request.load_id) > 128:
                raise invalid("load_id", "1..128 characters, the same on every batch")
            if not domain.is_municipality(request.municipality_code):
                raise invalid("municipality_code", "must be a listed municipality", Reason.UNKNOWN_MUNICIPALITY)
            check_sender(peer, {request.municipality_code}, national=national, prefecture=prefecture)
            if not national and request.municipality_code[:2] != prefecture:
                raise invalid("municipality_code", "not a municipality of this prefecture")
            summary.load_id, summary.municipality_code = request.load_id, request.municipality_code
            replay = await store.bulk_load_done(request.load_id)
        elif request.load_id != summary.load_id or request.municipality_code != summary.municipality_code:
            raise invalid("load_id", "every batch of a load carries the same load_id and municipality_code")
        through = max(through, request.through_sequence)
        summary.records_received += len(request.records)
        if replay:
            summary.records_unchanged += len(request.records)
            continue
        await _apply_batch(store, request, summary)
        if forwarder is not None:
            await forwarder.put(request)  # passed on as applied: memory holds a few batches, not the load
    if not summary.load_id:
        raise invalid("load_id", "a load needs at least one batch")
    if replay:
        return summary
    if forwarder is not None:
        await forwarder.finish()
    await store.finish_bulk_load(summary.load_id, summary.municipality_code, through, summary.records_applied)
    return summary


async def _apply_batch(store: Store, request: intake_pb2.BulkLoadRequest, summary: intake_pb2.BulkLoadResponse) -> None:
    valid: dict[str, dict[str, Any]] = {}
    for record in request.records:
        found = _violations(record, request.municipality_code)
        if found:
            summary.records_rejected += 1
            if len(summary.rejections) < MAX_REJECTIONS:
                summary.rejections.append(intake_pb2.BulkLoadRejection(resident_code=record.resident_code,
                                                                       violations=found))
            continue
        valid[record.resident_code] = _row(record)
    counts = await store.apply_bulk(valid)
    summary.records_applied += counts.applied
    summary.records_unchanged += counts.unchanged


FORWARD_WINDOW = 4  # batches applied here and not yet taken by the national intake's stream


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

    async def _batches(self) -> AsyncIterator[intake_pb2.BulkLoadRequest]:
        while (request := await self._queue.get()) is not None:
            yield request

    async def put(self, request: intake_pb2.BulkLoadRequest) -> None:
        if self._task is None:
            self._channel = secure_channel(self._target, self._tls)
            stub = intake_pb2_grpc.IntakeServiceStub(self._channel)
            self._task = asyncio.create_task(_national(stub.BulkLoad(self._batches(), timeout=3600)))
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
