"""The CardService servicer: card lifecycle, PIN checks and 転入転出の特例 (the special move).

Every date rule asks the business clock (``app.today()``); state-changing counter actions need an
operator proof. The wide-area copy (住民票の写しの広域交付) is in :mod:`juki.card.wide_area`; the process
wiring in :mod:`juki.card.app`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg

from juki import domain
from juki._gen.juki.card.v1 import card_pb2, card_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2
from juki.card import rules, store, wide_area
from juki.card.convert import (
    PHOTO_DOCUMENTS,
    card_message,
    check_municipality,
    date_from_proto,
    date_to_proto,
    provision,
)
from juki.card.store import StoredCard
from juki.mesh.errors import JukiError, Reason, invalid
from juki.mesh.methods import require_method
from juki.mesh.operator import VerifiedOperator
from juki.mesh.tls import require_peer

if TYPE_CHECKING:
    from juki.card.context import CardBackend

# Namespace of the request ids (AIP-155) of the changes this service records at the municipal CSs.
REQUEST_IDS = uuid.UUID("6d1f6a52-3b1e-5a7c-9f44-2c8e0b7d9a13")

SERVICE_NAME = "juki.card.v1.CardService"


class CardServicer(card_pb2_grpc.CardServiceServicer):
    """Thin servicer: one handler per RPC, the rules in :mod:`juki.card.rules`."""

    def __init__(self, app: CardBackend) -> None:
        self.app = app

    # -- helpers -----------------------------------------------------------------------------------

    async def verify_operator(self, request: Any, *, required: bool = False) -> VerifiedOperator | None:
        """The operator proof by the method table's rule (app.py); ``required`` when this request needs one
        whatever the rule says (a wide-area copy on a photo-ID check)."""
        if required:
            return await self.app.operators.verify(require_method().path, request)
        return await self.app.operators.check(request)

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

    async def require_pin(self, card_number: str, pin: str, field: str = "pin",
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
        operator = await self.verify_operator(request)
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
        check_municipality(request.municipality_code, "municipality_code")
        entry = await self.app.entry(request.municipality_code, request.resident_code, "CARD_ISSUANCE")
        if entry.status != common_pb2.RESIDENT_STATUS_CURRENT:
            raise invalid("municipality_code", "the applicant is not a current resident of this municipality")
        foreign = entry.resident_kind == common_pb2.RESIDENT_KIND_FOREIGN
        stay_end = date_from_proto(request.period_of_stay_end, "period_of_stay_end", required=False) or date_from_proto(
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
        card = await self.require_pin(request.card_number, request.current_pin, "current_pin")
        salt, digest = await asyncio.to_thread(rules.hash_pin, request.new_pin)
        async with self.app.db().acquire() as conn, conn.transaction():
            card = await store.update(conn, card.card_number, pin_salt=salt, pin_hash=digest)
            await store.event(conn, card.card_number, "pin_changed", peer=require_peer().spiffe_id)
        return card_pb2.ChangePinResponse(card=card_message(card, self.app.today()))

    async def UnlockCard(self, request: card_pb2.UnlockCardRequest, context: Any) -> card_pb2.UnlockCardResponse:
        operator = await self.verify_operator(request)
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
        operator = await self.verify_operator(request)
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
        operator = await self.verify_operator(request)
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
        operator = await self.verify_operator(request)
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
        return await wide_area.request_copy(self, request)

    # -- 転入転出の特例 -----------------------------------------------------------------------------

    async def FileSpecialMoveOut(self, request: card_pb2.FileSpecialMoveOutRequest, context: Any
                                 ) -> card_pb2.FileSpecialMoveOutResponse:
        operator = await self.verify_operator(request)
        assert operator is not None
        today = self.app.today()
        planned = date_from_proto(request.planned_move_on, "planned_move_on")
        assert planned is not None
        check_municipality(request.destination_municipality_code, "destination_municipality_code")
        card = await self.require_pin(request.card_number, request.pin)
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
        return card_pb2.FileSpecialMoveOutResponse(card=card_message(card, today), move_in_deadline=date_to_proto(deadline))

    async def _notify_move_out(self, card: StoredCard, moved_on: dt.date) -> None:
        """Record the 転出 at the old municipality's CS (once)."""
        async with self.app.db().acquire() as conn:
            move = await store.open_move(conn, card.card_number)
        if move is None or move.moved_out_notified:
            return
        await self.app.record_change(move.from_municipality, municipal_pb2.RecordChangeRequest(
            change_kind=common_pb2.CHANGE_KIND_MOVE_OUT,
            entry=municipal_pb2.ResidentEntry(resident_code=move.resident_code),
            occurred_on=date_to_proto(min(move.planned_move_on, moved_on)), notified_on=date_to_proto(self.app.today()),
            next_municipality_code=move.to_municipality,
            # Keyed on the move: if this process dies after the CS recorded the 転出 but before the flag
            # below is set, the next attempt is answered from the first instead of recording it twice.
            request_id=str(uuid.uuid5(REQUEST_IDS, f"{move.move_id}/special-move-out")),
        ))
        async with self.app.db().acquire() as conn:
            await conn.execute("UPDATE special_moves SET moved_out_notified = true WHERE move_id = $1", move.move_id)

    async def SpecialMoveIn(self, request: card_pb2.SpecialMoveInRequest, context: Any
                            ) -> card_pb2.SpecialMoveInResponse:
        operator = await self.verify_operator(request)
        assert operator is not None
        today = self.app.today()
        moved_on = date_from_proto(request.moved_on, "moved_on")
        assert moved_on is not None
        if moved_on > today:
            raise invalid("moved_on", "the move date lies in the future")
        if not request.street.strip():
            raise invalid("street", "the new address is required")
        try:
            domain.normalise_street(request.street)
        except domain.InvalidText as exc:  # checked here: the CS would refuse it as a field of its own request
            raise invalid("street", f"the street {exc}") from None
        check_municipality(request.municipality_code, "municipality_code")
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
        card = await self.require_pin(request.card_number, request.pin)
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
            change_kind=common_pb2.CHANGE_KIND_SPECIAL_MOVE_IN, entry=entry, occurred_on=date_to_proto(moved_on),
            notified_on=date_to_proto(today), previous_municipality_code=move.from_municipality,
            request_id=str(uuid.uuid5(REQUEST_IDS, f"{move.move_id}/special-move-in")),
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
