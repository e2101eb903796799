"""The card service (住基カード): lifecycle, PIN checks, wide-area copies and the special move.

Every date rule asks the business clock (``settings.clock``; tests move it). State-changing counter
actions need an operator proof. The service reaches the municipal CSs (``settings.peers.municipal``)
with its own certificate (``service/card``) and logs every wide-area copy to the access log before
handing it out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc

from juki import domain
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.card.v1 import card_pb2, card_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.card import rules, store
from juki.card.store import StoredCard
from juki.mesh.db import create_pool
from juki.mesh.errors import FieldViolation, JukiError, Reason, SettingsError, invalid
from juki.mesh.operator import OperatorVerifier, VerifiedOperator, load_passwords
from juki.mesh.server import ServiceBinding
from juki.mesh.settings import ServiceSettings
from juki.mesh.tls import Peer, require_peer, secure_channel

log = logging.getLogger(__name__)

SERVICE_NAME = "juki.card.v1.CardService"
SELF_ID = "spiffe://juki.local/service/card"
WIDE_AREA_COPY = "WIDE_AREA_COPY"
WIDE_AREA_COPY_NAME = "住民票の写しの広域交付"
_LAPSING = {
    common_pb2.RESIDENT_STATUS_DECEASED: "死亡",
    common_pb2.RESIDENT_STATUS_CODE_RETIRED: "住民票コード変更",
}
PHOTO_DOCUMENTS = frozenset({"passport", "driving_licence", "card_type_b", "residence_card",
                             "disability_certificate", "my_number_card"})


def _date(value: common_pb2.Date, field: str, *, required: bool = True) -> dt.date | None:
    if value.year == 0 and value.month == 0 and value.day == 0:
        if required:
            raise invalid(field, f"{field} is required")
        return None
    try:
        return dt.date(value.year, value.month, value.day)
    except ValueError:
        raise invalid(field, f"{field} is not a valid date") from None


def _pdate(day: dt.date) -> common_pb2.Date:
    return common_pb2.Date(year=day.year, month=day.month, day=day.day, precision=common_pb2.DATE_PRECISION_FULL)


def _check_municipality(code: str, field: str) -> None:
    if not (len(code) == 6 and code.isdigit()):
        raise invalid(field, f"{field} must be a 6-digit local-government code")
    if not domain.is_valid_local_government_code(code):
        raise invalid(field, f"{field} {code} fails the check digit", Reason.CHECK_DIGIT_MISMATCH)
    if not domain.is_municipality(code):
        raise invalid(field, f"{field} {code} is not a municipality", Reason.UNKNOWN_MUNICIPALITY)


def _remote(error: grpc.aio.AioRpcError, what: str) -> JukiError:
    """A failure of another service of the mesh, as this service's caller should see it."""
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return JukiError(Reason.RESIDENT_NOT_FOUND, f"{what}: {error.details()}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return JukiError(Reason.DEPENDENCY_UNAVAILABLE, f"{what} is unavailable")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return JukiError(Reason.INVALID_FIELD, f"{what} refused the request: {error.details()}",
                         violations=[FieldViolation("request", error.details() or "refused")])
    return JukiError(Reason.FAILED_PRECONDITION, f"{what} refused: {code.name} {error.details()}")


class CardApp:
    """Pool, clock, operator proofs and channels to the municipal CSs and the access log."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        try:
            self.clock = domain.parse_clock(settings.clock)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        self.pool: asyncpg.Pool | None = None
        self._operators: OperatorVerifier | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def operators(self) -> OperatorVerifier:
        assert self._operators is not None, "not started"
        return self._operators

    def db(self) -> asyncpg.Pool:
        assert self.pool is not None, "not started"
        return self.pool

    def today(self) -> dt.date:
        return self.clock.today()

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = secure_channel(address, self.settings.tls)
        return self._channels[address]

    def municipal(self, code: str) -> municipal_pb2_grpc.MunicipalServiceStub:
        address = self.settings.peers.municipal.get(code)
        if address is None:
            raise JukiError(Reason.DEPENDENCY_UNAVAILABLE, f"municipality {code} is not reachable from this mesh",
                            metadata={"municipality_code": code})
        return municipal_pb2_grpc.MunicipalServiceStub(self._channel(address))

    async def entry(self, municipality_code: str, resident_code: str, purpose: str,
                    requesting: str = "") -> municipal_pb2.ResidentEntry:
        try:
            response = await self.municipal(municipality_code).GetResidentEntry(
                municipal_pb2.GetResidentEntryRequest(
                    resident_code=resident_code, requesting_municipality_code=requesting, purpose=purpose),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            raise _remote(error, f"the municipal CS of {municipality_code}") from None
        entry: municipal_pb2.ResidentEntry = response.entry
        return entry

    async def locate(self, resident_code: str, purpose: str) -> municipal_pb2.ResidentEntry:
        """Find a resident's current entry by asking the municipal CSs of the mesh (home municipality)."""
        codes = list(self.settings.peers.municipal)
        results = await asyncio.gather(*[self.entry(c, resident_code, purpose) for c in codes],
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, municipal_pb2.ResidentEntry) and result.status == common_pb2.RESIDENT_STATUS_CURRENT:
                return result
        raise JukiError(Reason.RESIDENT_NOT_FOUND, "no municipality of the network registers this resident now")

    async def record_change(self, municipality_code: str, request: municipal_pb2.RecordChangeRequest
                            ) -> municipal_pb2.RecordChangeResponse:
        try:
            response: municipal_pb2.RecordChangeResponse = await self.municipal(municipality_code).RecordChange(
                request, timeout=20)
        except grpc.aio.AioRpcError as error:
            raise _remote(error, f"the municipal CS of {municipality_code}") from None
        return response

    async def log_provision(self, record: accesslog_pb2.ProvisionRecord) -> None:
        """Durably log a provision, or refuse to provide (ACCESS_LOG_UNAVAILABLE)."""
        address = self.settings.peers.accesslog
        if not address:
            raise JukiError(Reason.ACCESS_LOG_UNAVAILABLE, "no access log is configured")
        stub = accesslog_pb2_grpc.AccessLogServiceStub(self._channel(address))
        try:
            await stub.Append(accesslog_pb2.AppendRequest(batch_id=str(uuid.uuid4()), records=[record]), timeout=10)
        except grpc.aio.AioRpcError as error:
            raise JukiError(Reason.ACCESS_LOG_UNAVAILABLE, f"the access log refused: {error.code().name}") from None

    async def start(self) -> Sequence[ServiceBinding]:
        self.pool = await create_pool(self.settings.database, self.settings.instance)
        self._operators = OperatorVerifier(
            self.settings.tls, self.pool,
            passwords=load_passwords(self.settings.extra.get("operator_passwords_file")),
        )
        counter = frozenset({"operator"})
        return [
            ServiceBinding(
                name=SERVICE_NAME,
                add_to_server=card_pb2_grpc.add_CardServiceServicer_to_server,
                servicer=CardServicer(self),
                access={
                    "IssueCard": counter,
                    "VerifyPin": frozenset({"operator", "municipality", "service"}),
                    "ChangePin": frozenset({"operator", "municipality"}),
                    "UnlockCard": counter,
                    "SuspendCard": counter,
                    "ReleaseSuspension": counter,
                    "RevokeCard": frozenset({"operator", "municipality"}),
                    "GetCardStatus": frozenset({"operator", "municipality", "service"}),
                    "RequestWideAreaCopy": counter,
                    "FileSpecialMoveOut": counter,
                    "SpecialMoveIn": counter,
                },
            )
        ]

    async def stop(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def on_refusal(self, peer: Peer | None, method: str, error: JukiError) -> None:
        log.warning("refused %s to %s: %s", method, peer.spiffe_id if peer else "unknown peer", error.reason.name)


def provision(*, recipient_municipality: str, provider_municipality: str, resident_code: str, purpose: str,
              purpose_name: str, mode: int, fields: Sequence[int], operator_id: str, reason: str,
              refused: Reason | None = None) -> accesslog_pb2.ProvisionRecord:
    """An access-log record of information one municipality's register gave (or refused) another."""
    place = domain.municipality(recipient_municipality)
    record = accesslog_pb2.ProvisionRecord(
        recipient=f"spiffe://juki.local/municipality/{recipient_municipality}",
        recipient_name=place.full_name if place else recipient_municipality,
        purpose=purpose, purpose_name=purpose_name, query_mode=mode,  # type: ignore[arg-type]
        provider_tier=common_pb2.TIER_MUNICIPALITY, provider=f"spiffe://juki.local/municipality/{provider_municipality}",
        fields=[] if refused else fields,  # type: ignore[arg-type]
        resident_code=resident_code, operator_id=operator_id, reason=reason,
        outcome=accesslog_pb2.PROVISION_OUTCOME_REFUSED if refused else accesslog_pb2.PROVISION_OUTCOME_PROVIDED,
    )
    if refused is not None:
        record.refusal_reason = common_pb2.ErrorReason.Value("ERROR_REASON_" + refused.name)
    record.provided_at.GetCurrentTime()
    return record


def card_message(card: StoredCard, today: dt.date) -> card_pb2.Card:
    message = card_pb2.Card(
        card_number=card.card_number, resident_code=card.resident_code,
        card_type=card.card_type,  # type: ignore[arg-type]
        state=rules.effective_state(card.facts, today),  # type: ignore[arg-type]
        issued_on=_pdate(card.issued_on), expires_on=_pdate(card.expires_on),
        failed_pin_attempts=card.failed_pin_attempts, issuing_municipality_code=card.issuing_municipality,
    )
    message.state_changed_at.FromDatetime(card.state_changed_at)
    return message


class CardServicer(card_pb2_grpc.CardServiceServicer):
    """Thin servicer: one handler per RPC, the rules in :mod:`juki.card.rules`."""

    def __init__(self, app: CardApp) -> None:
        self.app = app

    # -- helpers -----------------------------------------------------------------------------------

    async def _operator(self, method: str, request: Any, *, required: bool = True) -> VerifiedOperator | None:
        if not required and not request.HasField("operator_proof"):
            return None
        return await self.app.operators.verify(f"/{SERVICE_NAME}/{method}", request)

    async def _card(self, conn: asyncpg.Connection, card_number: str, *, for_update: bool = True,
                    field: str = "card_number") -> StoredCard:
        if not card_number:
            raise invalid(field, "the card number is required")
        if len(card_number) != 16 or not card_number.isascii() or not card_number.isdigit():
            raise invalid(field, "a card number is 16 digits")
        card = await store.get(conn, card_number, for_update=for_update)
        if card is None:
            raise JukiError(Reason.CARD_NOT_FOUND, metadata={"card_number": card_number})
        return card

    async def _check_pin(self, card_number: str, pin: str, field: str = "pin",
                         card_field: str = "card_number") -> tuple[StoredCard, bool, int]:
        """Check a PIN against a usable card; count a wrong one (3 lock the card). Committed either way."""
        rules.check_pin_format(pin, field)
        today = self.app.today()
        async with self.app.db().acquire() as conn, conn.transaction():
            card = await self._card(conn, card_number, field=card_field)
            rules.require_usable(card.facts, today)
            ok = await asyncio.to_thread(rules.pin_matches, pin, card.pin_salt, card.pin_hash)
            peer = require_peer().spiffe_id
            if ok:
                if card.failed_pin_attempts:
                    card = await store.update(conn, card.card_number, failed_pin_attempts=0)
                await store.event(conn, card.card_number, "pin_ok", peer=peer)
            else:
                failed = card.failed_pin_attempts + 1
                if failed >= rules.MAX_PIN_ATTEMPTS:
                    card = await store.update(conn, card.card_number, failed_pin_attempts=failed, state=rules.LOCKED)
                    await store.event(conn, card.card_number, "locked", f"{failed} wrong PINs", peer=peer)
                else:
                    card = await store.update(conn, card.card_number, failed_pin_attempts=failed)
                    await store.event(conn, card.card_number, "pin_wrong", str(failed), peer=peer)
        return card, ok, max(rules.MAX_PIN_ATTEMPTS - card.failed_pin_attempts, 0)

    async def _require_pin(self, card_number: str, pin: str, field: str = "pin",
                           card_field: str = "card_number") -> StoredCard:
        card, ok, remaining = await self._check_pin(card_number, pin, field, card_field)
        if not ok:
            if card.state == rules.LOCKED:
                raise JukiError(Reason.CARD_LOCKED, "three wrong PINs: the card is locked; unlock in person")
            raise JukiError(Reason.PIN_MISMATCH, f"wrong PIN; {remaining} attempt(s) left before the card locks",
                            metadata={"remaining_attempts": str(remaining)})
        return card

    # -- lifecycle ---------------------------------------------------------------------------------

    async def IssueCard(self, request: card_pb2.IssueCardRequest, context: Any) -> card_pb2.IssueCardResponse:
        operator = await self._operator("IssueCard", request)
        assert operator is not None
        today = self.app.today()
        rules.check_issuance(today)
        if request.card_type not in (card_pb2.CARD_TYPE_A, card_pb2.CARD_TYPE_B):
            raise invalid("card_type", "card_type must be CARD_TYPE_A or CARD_TYPE_B")
        if request.card_type == card_pb2.CARD_TYPE_B and not request.photo:
            raise invalid("photo", "a type B card carries a photo")
        if request.card_type == card_pb2.CARD_TYPE_A and request.photo:
            raise invalid("photo", "a type A card has no photo")
        rules.check_pin_format(request.pin)
        if not domain.is_valid_resident_code(request.resident_code):
            raise invalid("resident_code", "must be 11 digits with a valid check digit")
        _check_municipality(request.municipality_code, "municipality_code")
        entry = await self.app.entry(request.municipality_code, request.resident_code, "CARD_ISSUANCE")
        if entry.status != common_pb2.RESIDENT_STATUS_CURRENT:
            raise invalid("municipality_code", "the applicant is not a current resident of this municipality")
        foreign = entry.resident_kind == common_pb2.RESIDENT_KIND_FOREIGN
        stay_end = _date(request.period_of_stay_end, "period_of_stay_end", required=False) or _date(
            entry.period_of_stay_end, "period_of_stay_end", required=False)
        if foreign and stay_end is None:
            raise invalid("period_of_stay_end", "a foreign resident's card needs the end of the period of stay")
        if stay_end is not None and stay_end < today:
            raise invalid("period_of_stay_end", "the period of stay has ended")
        salt, digest = await asyncio.to_thread(rules.hash_pin, request.pin)
        card = StoredCard(
            card_number=store.new_card_number(), resident_code=request.resident_code,
            card_type=request.card_type, resident_kind=entry.resident_kind, state=rules.ACTIVE,
            state_before_suspension=None, failed_pin_attempts=0, pin_salt=salt, pin_hash=digest,
            issued_on=today, expires_on=rules.expiry(today, stay_end if foreign else None),
            issuing_municipality=request.municipality_code, home_municipality=request.municipality_code,
            revoked_reason="", state_changed_at=dt.datetime.now(dt.UTC),
        )
        async with self.app.db().acquire() as conn, conn.transaction():
            for held in await store.of_resident(conn, request.resident_code, for_update=True):
                state = rules.effective_state(held.facts, today)
                if state == rules.REVOKED:
                    continue
                if state != rules.EXPIRED and (held.expires_on - today).days > rules.RENEWAL_WINDOW_DAYS:
                    raise JukiError(Reason.FAILED_PRECONDITION,
                                    f"the resident holds card {held.card_number} valid until {held.expires_on}",
                                    metadata={"card_number": held.card_number})
                await store.update(conn, held.card_number, state=rules.REVOKED, revoked_reason="更新")
                await store.event(conn, held.card_number, "revoked", "更新 (renewed)", operator.operator_id)
            await store.insert(conn, card, request.photo or None)
            await store.event(conn, card.card_number, "issued", f"type {card_pb2.CardType.Name(request.card_type)}",
                              operator.operator_id, require_peer().spiffe_id)
            stored = await store.get(conn, card.card_number)
        assert stored is not None
        return card_pb2.IssueCardResponse(card=card_message(stored, today))

    async def VerifyPin(self, request: card_pb2.VerifyPinRequest, context: Any) -> card_pb2.VerifyPinResponse:
        card, ok, remaining = await self._check_pin(request.card_number, request.pin)
        today = self.app.today()
        return card_pb2.VerifyPinResponse(ok=ok, remaining_attempts=remaining,
                                          state=rules.effective_state(card.facts, today))  # type: ignore[arg-type]

    async def ChangePin(self, request: card_pb2.ChangePinRequest, context: Any) -> card_pb2.ChangePinResponse:
        rules.check_pin_format(request.new_pin, "new_pin")
        card = await self._require_pin(request.card_number, request.current_pin, "current_pin")
        salt, digest = await asyncio.to_thread(rules.hash_pin, request.new_pin)
        async with self.app.db().acquire() as conn, conn.transaction():
            card = await store.update(conn, card.card_number, pin_salt=salt, pin_hash=digest)
            await store.event(conn, card.card_number, "pin_changed", peer=require_peer().spiffe_id)
        return card_pb2.ChangePinResponse(card=card_message(card, self.app.today()))

    async def UnlockCard(self, request: card_pb2.UnlockCardRequest, context: Any) -> card_pb2.UnlockCardResponse:
        operator = await self._operator("UnlockCard", request)
        assert operator is not None
        if request.new_pin:
            rules.check_pin_format(request.new_pin, "new_pin")
        today = self.app.today()
        async with self.app.db().acquire() as conn, conn.transaction():
            card = await self._card(conn, request.card_number)
            rules.require_usable(card.facts, today, allow_locked=True)
            if card.state != rules.LOCKED:
                raise JukiError(Reason.FAILED_PRECONDITION, "the card is not locked")
            fields: dict[str, object] = {"state": rules.ACTIVE, "failed_pin_attempts": 0}
            if request.new_pin:
                fields["pin_salt"], fields["pin_hash"] = await asyncio.to_thread(rules.hash_pin, request.new_pin)
            card = await store.update(conn, card.card_number, **fields)
            await store.event(conn, card.card_number, "unlocked", "in person" + (", new PIN" if request.new_pin else ""),
                              operator.operator_id, require_peer().spiffe_id)
        return card_pb2.UnlockCardResponse(card=card_message(card, today))

    async def SuspendCard(self, request: card_pb2.SuspendCardRequest, context: Any) -> card_pb2.SuspendCardResponse:
        operator = await self._operator("SuspendCard", request)
        assert operator is not None
        if request.channel not in (card_pb2.SUSPENSION_CHANNEL_PHONE, card_pb2.SUSPENSION_CHANNEL_COUNTER):
            raise invalid("channel", "channel must be SUSPENSION_CHANNEL_PHONE or SUSPENSION_CHANNEL_COUNTER")
        today = self.app.today()
        async with self.app.db().acquire() as conn, conn.transaction():
            card = await self._card(conn, request.card_number)
            if card.state == rules.REVOKED:
                raise JukiError(Reason.CARD_REVOKED)
            if card.state != rules.SUSPENDED:
                card = await store.update(conn, card.card_number, state=rules.SUSPENDED,
                                          state_before_suspension=card.state)
            channel = card_pb2.SuspensionChannel.Name(request.channel)
            await store.event(conn, card.card_number, "suspended", f"{channel}: {request.reason or '紛失'}",
                              operator.operator_id, require_peer().spiffe_id)
        return card_pb2.SuspendCardResponse(card=card_message(card, today))

    async def ReleaseSuspension(self, request: card_pb2.ReleaseSuspensionRequest, context: Any
                                ) -> card_pb2.ReleaseSuspensionResponse:
        operator = await self._operator("ReleaseSuspension", request)
        assert operator is not None
        if request.identity_document not in PHOTO_DOCUMENTS:
            raise invalid("identity_document",
                          "release is in person with a photo ID: one of " + ", ".join(sorted(PHOTO_DOCUMENTS)))
        today = self.app.today()
        async with self.app.db().acquire() as conn, conn.transaction():
            card = await self._card(conn, request.card_number)
            if card.state == rules.REVOKED:
                raise JukiError(Reason.CARD_REVOKED)
            if card.state != rules.SUSPENDED:
                raise JukiError(Reason.FAILED_PRECONDITION, "the card is not suspended")
            card = await store.update(conn, card.card_number, state=card.state_before_suspension or rules.ACTIVE,
                                      state_before_suspension=None)
            await store.event(conn, card.card_number, "released", f"in person, {request.identity_document}",
                              operator.operator_id, require_peer().spiffe_id)
        return card_pb2.ReleaseSuspensionResponse(card=card_message(card, today))

    async def RevokeCard(self, request: card_pb2.RevokeCardRequest, context: Any) -> card_pb2.RevokeCardResponse:
        peer = require_peer()
        operator = await self._operator("RevokeCard", request, required=peer.kind == "operator")
        if not request.reason:
            raise invalid("reason", "say why the card is revoked, e.g. 返納, 死亡, 住民票コード変更")
        if bool(request.card_number) == bool(request.resident_code):
            raise invalid("card_number", "give either card_number or resident_code")
        today = self.app.today()
        async with self.app.db().acquire() as conn, conn.transaction():
            if request.card_number:
                cards = [await self._card(conn, request.card_number)]
            else:
                cards = await store.of_resident(conn, request.resident_code, for_update=True)
            if peer.kind == "municipality" and any(c.home_municipality != peer.name for c in cards):
                raise JukiError(Reason.PEER_NOT_AUTHORISED, "a municipality revokes only the cards of its residents")
            revoked: list[StoredCard] = []
            for card in cards:
                if card.state != rules.REVOKED:
                    card = await store.update(conn, card.card_number, state=rules.REVOKED,
                                              revoked_reason=request.reason)
                    await store.event(conn, card.card_number, "revoked", request.reason,
                                      operator.operator_id if operator else "", peer.spiffe_id)
                    revoked.append(card)
        response = card_pb2.RevokeCardResponse(revoked=len(revoked))
        shown = revoked[0] if revoked else (cards[0] if cards else None)
        if shown is not None:
            response.card.CopyFrom(card_message(shown, today))
        return response

    async def GetCardStatus(self, request: card_pb2.GetCardStatusRequest, context: Any
                            ) -> card_pb2.GetCardStatusResponse:
        async with self.app.db().acquire() as conn:
            card = await self._card(conn, request.card_number, for_update=False)
        return card_pb2.GetCardStatusResponse(card=card_message(card, self.app.today()))

    # -- wide-area copy ----------------------------------------------------------------------------

    async def RequestWideAreaCopy(self, request: card_pb2.RequestWideAreaCopyRequest, context: Any
                                  ) -> card_pb2.RequestWideAreaCopyResponse:
        peer = require_peer()
        _check_municipality(request.issuing_municipality_code, "issuing_municipality_code")
        proof = request.WhichOneof("applicant_proof")
        operator: VerifiedOperator | None
        if proof == "card_proof":
            operator = await self._operator("RequestWideAreaCopy", request, required=False)
            card = await self._require_pin(request.card_proof.card_number, request.card_proof.pin,
                                           "card_proof.pin", "card_proof.card_number")
            applicant_code, home = card.resident_code, card.home_municipality
            applicant = await self.app.entry(home, applicant_code, WIDE_AREA_COPY, request.issuing_municipality_code)
            if applicant.status == common_pb2.RESIDENT_STATUS_MOVED_OUT:
                applicant, home = await self._follow_move(card, applicant, peer)
            lapsed = _LAPSING.get(applicant.status)
            if lapsed is not None:  # the register knows of a death or code change the card missed
                async with self.app.db().acquire() as conn, conn.transaction():
                    await store.update(conn, card.card_number, state=rules.REVOKED, revoked_reason=lapsed)
                    await store.event(conn, card.card_number, "revoked", lapsed, peer=peer.spiffe_id)
                raise JukiError(Reason.CARD_REVOKED, f"the card lapsed: {lapsed}")
            method = "card"
        elif proof == "photo_id_check":
            operator = await self._operator("RequestWideAreaCopy", request)
            check = request.photo_id_check
            if check.identity_document not in PHOTO_DOCUMENTS:
                raise invalid("photo_id_check.identity_document",
                              "a photo ID is required: one of " + ", ".join(sorted(PHOTO_DOCUMENTS)))
            if not domain.is_valid_resident_code(check.applicant_resident_code):
                raise invalid("photo_id_check.applicant_resident_code", "must be a valid resident code")
            applicant_code = check.applicant_resident_code
            applicant = await self.app.locate(applicant_code, WIDE_AREA_COPY)
            home = applicant.address.municipality_code
            method = f"photo ID ({check.identity_document})"
        else:
            raise invalid("applicant_proof", "give card_proof (card and PIN) or photo_id_check")
        if applicant.status != common_pb2.RESIDENT_STATUS_CURRENT:
            raise JukiError(Reason.RESIDENT_NOT_FOUND, "the applicant is not a current resident")
        subject_code = request.subject_resident_code or applicant_code
        if subject_code == applicant_code:
            subject = applicant
        else:
            if not domain.is_valid_resident_code(subject_code):
                raise invalid("subject_resident_code", "must be a valid resident code")
            try:
                subject = await self.app.entry(home, subject_code, WIDE_AREA_COPY, request.issuing_municipality_code)
                same = (subject.household_id == applicant.household_id
                        and subject.status == common_pb2.RESIDENT_STATUS_CURRENT)
            except JukiError as error:
                if error.reason is not Reason.RESIDENT_NOT_FOUND:
                    raise
                same = False
            if not same:
                # The refused attempt is recorded too, so the subject's disclosure shows it.
                try:
                    await self.app.log_provision(provision(
                        recipient_municipality=request.issuing_municipality_code, provider_municipality=home,
                        resident_code=subject_code, purpose=WIDE_AREA_COPY, purpose_name=WIDE_AREA_COPY_NAME,
                        mode=common_pb2.QUERY_MODE_WIDE_AREA_COPY, fields=[],
                        operator_id=operator.operator_id if operator else "",
                        reason=f"{WIDE_AREA_COPY_NAME} (同一世帯でない申請者)", refused=Reason.NOT_SAME_HOUSEHOLD))
                except JukiError:
                    log.warning("could not log a refused wide-area copy")
                raise JukiError(Reason.NOT_SAME_HOUSEHOLD, "the subject is not in the applicant's household")
        certificate = card_pb2.ResidentCertificate(
            name=subject.name, birth_date=subject.birth_date, sex=subject.sex, address=subject.address,
            resident_kind=subject.resident_kind, became_resident_on=subject.became_resident_on,
            address_since=subject.address_since, address_notified_on=subject.address_notified_on,
            previous_address=subject.previous_address, period_of_stay_end=subject.period_of_stay_end,
        )
        fields = [common_pb2.FIELD_NAME, common_pb2.FIELD_BIRTH_DATE, common_pb2.FIELD_SEX, common_pb2.FIELD_ADDRESS]
        if request.include_household_head_and_relationship:
            certificate.household_head, certificate.relationship = subject.household_head, subject.relationship
        if request.include_resident_code:
            certificate.resident_code = subject.resident_code
            fields.append(common_pb2.FIELD_RESIDENT_CODE)
        if request.include_individual_number:
            certificate.individual_number = subject.individual_number
        now = dt.datetime.now(dt.UTC)
        document_number = f"{request.issuing_municipality_code}-{self.app.today():%Y%m%d}-{uuid.uuid4().hex[:8].upper()}"
        record = provision(
            recipient_municipality=request.issuing_municipality_code, provider_municipality=home,
            resident_code=subject.resident_code, purpose=WIDE_AREA_COPY, purpose_name=WIDE_AREA_COPY_NAME,
            mode=common_pb2.QUERY_MODE_WIDE_AREA_COPY, fields=fields,
            operator_id=operator.operator_id if operator else "",
            reason=f"{WIDE_AREA_COPY_NAME} (本人確認: {method}; 申請者 {'本人' if subject is applicant else '同一世帯員'})",
        )
        await self.app.log_provision(record)
        if proof == "card_proof":
            async with self.app.db().acquire() as conn:
                await store.event(conn, request.card_proof.card_number, "wide_area_copy", document_number,
                                  operator.operator_id if operator else "", peer.spiffe_id)
        response = card_pb2.RequestWideAreaCopyResponse(
            certificate=certificate, issued_by=request.issuing_municipality_code, document_number=document_number)
        response.issued_at.FromDatetime(now)
        return response

    async def _follow_move(self, card: StoredCard, left: municipal_pb2.ResidentEntry, peer: Peer
                           ) -> tuple[municipal_pb2.ResidentEntry, str]:
        """The holder moved (an ordinary 転出/転入 at the counters): from 2012-07-09 the card follows
        them to the new municipality; a move-in before that date made the card lapse."""
        try:
            arrived = await self.app.locate(left.resident_code, WIDE_AREA_COPY)
        except JukiError:
            return left, card.home_municipality  # moved abroad or not yet moved in: refused below
        moved_in = _date(arrived.became_resident_on, "became_resident_on", required=False) or self.app.today()
        new_home = arrived.address.municipality_code
        async with self.app.db().acquire() as conn, conn.transaction():
            if rules.continued_use_after_move(moved_in):
                await store.update(conn, card.card_number, home_municipality=new_home)
                await store.event(conn, card.card_number, "follows_move", f"{card.home_municipality} -> {new_home}",
                                  peer=peer.spiffe_id)
            else:
                reason = "転入 (継続利用は2012-07-09から)"
                await store.update(conn, card.card_number, state=rules.REVOKED, revoked_reason=reason)
                await store.event(conn, card.card_number, "revoked", reason, peer=peer.spiffe_id)
        if not rules.continued_use_after_move(moved_in):
            raise JukiError(Reason.CARD_REVOKED, f"the card lapsed with the move-in on {moved_in}")
        return arrived, new_home

    # -- 転入転出の特例 -----------------------------------------------------------------------------

    async def FileSpecialMoveOut(self, request: card_pb2.FileSpecialMoveOutRequest, context: Any
                                 ) -> card_pb2.FileSpecialMoveOutResponse:
        operator = await self._operator("FileSpecialMoveOut", request)
        assert operator is not None
        today = self.app.today()
        planned = _date(request.planned_move_on, "planned_move_on")
        assert planned is not None
        _check_municipality(request.destination_municipality_code, "destination_municipality_code")
        card = await self._require_pin(request.card_number, request.pin)
        if request.destination_municipality_code == card.home_municipality:
            raise invalid("destination_municipality_code", "a move within the municipality is a 転居, not a 転出")
        rules.check_special_move_out(planned, today)
        deadline = rules.special_move_in_deadline(planned)
        entry = await self.app.entry(card.home_municipality, card.resident_code, "SPECIAL_MOVE_OUT")
        if entry.status != common_pb2.RESIDENT_STATUS_CURRENT:
            raise JukiError(Reason.RESIDENT_NOT_FOUND, "the holder is not a current resident of the card's municipality")
        async with self.app.db().acquire() as conn, conn.transaction():
            if await store.open_move(conn, card.card_number, for_update=True) is not None:
                raise JukiError(Reason.FAILED_PRECONDITION, "a special move-out is already filed for this card")
            await store.file_move(conn, card, request.destination_municipality_code, planned, deadline, today)
            await store.event(conn, card.card_number, "special_move_out",
                              f"to {request.destination_municipality_code} on {planned}", operator.operator_id,
                              require_peer().spiffe_id)
        if planned <= today:
            await self._notify_move_out(card, planned)
        return card_pb2.FileSpecialMoveOutResponse(card=card_message(card, today), move_in_deadline=_pdate(deadline))

    async def _notify_move_out(self, card: StoredCard, moved_on: dt.date) -> None:
        """Record the 転出 at the old municipality's CS (once)."""
        async with self.app.db().acquire() as conn:
            move = await store.open_move(conn, card.card_number)
        if move is None or move.moved_out_notified:
            return
        await self.app.record_change(move.from_municipality, municipal_pb2.RecordChangeRequest(
            change_kind=common_pb2.CHANGE_KIND_MOVE_OUT,
            entry=municipal_pb2.ResidentEntry(resident_code=move.resident_code),
            occurred_on=_pdate(min(move.planned_move_on, moved_on)), notified_on=_pdate(self.app.today()),
            next_municipality_code=move.to_municipality,
        ))
        async with self.app.db().acquire() as conn:
            await conn.execute("UPDATE special_moves SET moved_out_notified = true WHERE move_id = $1", move.move_id)

    async def SpecialMoveIn(self, request: card_pb2.SpecialMoveInRequest, context: Any
                            ) -> card_pb2.SpecialMoveInResponse:
        operator = await self._operator("SpecialMoveIn", request)
        assert operator is not None
        today = self.app.today()
        moved_on = _date(request.moved_on, "moved_on")
        assert moved_on is not None
        if moved_on > today:
            raise invalid("moved_on", "the move date lies in the future")
        if not request.street.strip():
            raise invalid("street", "the new address is required")
        _check_municipality(request.municipality_code, "municipality_code")
        async with self.app.db().acquire() as conn:
            move = await store.open_move(conn, request.card_number)
        if move is None:
            if not request.card_number:
                raise invalid("card_number", "the card number is required")
            raise JukiError(Reason.FAILED_PRECONDITION, "no special move-out (付記転出届) is filed for this card")
        rules.check_special_move_in(move.deadline, moved_on, today)
        if request.municipality_code != move.to_municipality:
            raise invalid("municipality_code",
                          f"the special move-out named {move.to_municipality} as the destination")
        card = await self._require_pin(request.card_number, request.pin)
        old = await self.app.entry(move.from_municipality, move.resident_code, "SPECIAL_MOVE_IN",
                                   request.municipality_code)
        # The old register's entry goes to the new municipality (転入通知 under the special procedure):
        # logged before anything is recorded, or nothing happens.
        await self.app.log_provision(provision(
            recipient_municipality=request.municipality_code, provider_municipality=move.from_municipality,
            resident_code=move.resident_code, purpose="SPECIAL_MOVE_IN", purpose_name="転入転出の特例（特例転入）",
            mode=common_pb2.QUERY_MODE_CARD_USE,
            fields=[common_pb2.FIELD_RESIDENT_CODE, common_pb2.FIELD_NAME, common_pb2.FIELD_BIRTH_DATE,
                    common_pb2.FIELD_SEX, common_pb2.FIELD_ADDRESS],
            operator_id=operator.operator_id, reason="特例転入（住基カードによる転入）"))
        await self._notify_move_out(card, moved_on)
        entry = municipal_pb2.ResidentEntry(
            resident_code=old.resident_code, name=old.name, birth_date=old.birth_date, sex=old.sex,
            resident_kind=old.resident_kind, registered_domicile=old.registered_domicile,
            head_of_family_register=old.head_of_family_register, individual_number=old.individual_number,
            period_of_stay_end=old.period_of_stay_end, previous_address=old.address,
            address=common_pb2.Address(municipality_code=request.municipality_code, street=request.street),
        )
        recorded = await self.app.record_change(request.municipality_code, municipal_pb2.RecordChangeRequest(
            change_kind=common_pb2.CHANGE_KIND_SPECIAL_MOVE_IN, entry=entry, occurred_on=_pdate(moved_on),
            notified_on=_pdate(today), previous_municipality_code=move.from_municipality,
        ))
        continued = rules.continued_use_after_move(today)
        async with self.app.db().acquire() as conn, conn.transaction():
            await conn.execute("UPDATE special_moves SET moved_in_on = $2, new_resident_code = $3 WHERE move_id = $1",
                               move.move_id, moved_on, recorded.resident_code)
            if continued:
                card = await store.update(conn, card.card_number, home_municipality=request.municipality_code)
            else:
                card = await store.update(conn, card.card_number, home_municipality=request.municipality_code,
                                          state=rules.REVOKED, revoked_reason="転入 (継続利用は2012-07-09から)")
            await store.event(conn, card.card_number, "special_move_in",
                              f"{move.from_municipality} -> {request.municipality_code}"
                              + ("" if continued else "; card lapses with the move"),
                              operator.operator_id, require_peer().spiffe_id)
        fresh = await self.app.entry(request.municipality_code, recorded.resident_code, "SPECIAL_MOVE_IN")
        return card_pb2.SpecialMoveInResponse(card=card_message(card, today), address=fresh.address)


def create(settings: ServiceSettings) -> CardApp:
    """Entry point used by ``juki serve card``."""
    return CardApp(settings)
