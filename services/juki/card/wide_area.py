"""住民票の写しの広域交付: a copy of the resident certificate issued by another municipality.

The applicant proves themselves with their card and PIN (the card follows an ordinary move from
2012-07-09) or, at the counter, with a photo ID and an operator proof. The subject may be the applicant
or a member of the same household. Every copy, and every copy refused for another household, is logged
to the access log before anything is handed out.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import TYPE_CHECKING

from juki import domain
from juki._gen.juki.card.v1 import card_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2
from juki.card import rules, store
from juki.card.convert import PHOTO_DOCUMENTS, check_municipality, date_from_proto, provision
from juki.card.store import StoredCard
from juki.mesh.errors import JukiError, Reason, invalid
from juki.mesh.operator import VerifiedOperator
from juki.mesh.tls import Peer, require_peer

if TYPE_CHECKING:
    from juki.card.context import CardBackend, CounterChecks

log = logging.getLogger(__name__)

WIDE_AREA_COPY = "WIDE_AREA_COPY"
WIDE_AREA_COPY_NAME = "住民票の写しの広域交付"
# Register statuses that end a card's use: the register knows of them before the card service may.
_LAPSING = {
    common_pb2.RESIDENT_STATUS_DECEASED: "死亡",
    common_pb2.RESIDENT_STATUS_CODE_RETIRED: "住民票コード変更",
}


async def request_copy(servicer: CounterChecks, request: card_pb2.RequestWideAreaCopyRequest
                       ) -> card_pb2.RequestWideAreaCopyResponse:
    """Issue a copy of the applicant's (or a household member's) resident certificate, logged first."""
    app = servicer.app
    peer = require_peer()
    check_municipality(request.issuing_municipality_code, "issuing_municipality_code")
    proof = request.WhichOneof("applicant_proof")
    operator: VerifiedOperator | None
    if proof == "card_proof":
        operator = await servicer.verify_operator(request)
        card = await servicer.require_pin(request.card_proof.card_number, request.card_proof.pin,
                                          "card_proof.pin", "card_proof.card_number")
        applicant_code, home = card.resident_code, card.home_municipality
        applicant = await app.entry(home, applicant_code, WIDE_AREA_COPY, request.issuing_municipality_code)
        if applicant.status == common_pb2.RESIDENT_STATUS_MOVED_OUT:
            applicant, home = await follow_move(app, card, applicant, peer)
        lapsed = _LAPSING.get(applicant.status)
        if lapsed is not None:  # the register knows of a death or code change the card missed
            async with app.db().acquire() as conn, conn.transaction():
                await store.update(conn, card.card_number, state=rules.REVOKED, revoked_reason=lapsed)
                await store.event(conn, card.card_number, "revoked", lapsed, peer=peer.spiffe_id)
            raise JukiError(Reason.CARD_REVOKED, f"the card lapsed: {lapsed}")
        method = "card"
    elif proof == "photo_id_check":
        operator = await servicer.verify_operator(request, required=True)
        check = request.photo_id_check
        if check.identity_document not in PHOTO_DOCUMENTS:
            raise invalid("photo_id_check.identity_document",
                          "a photo ID is required: one of " + ", ".join(sorted(PHOTO_DOCUMENTS)))
        if not domain.is_valid_resident_code(check.applicant_resident_code):
            raise invalid("photo_id_check.applicant_resident_code", "must be a valid resident code")
        applicant_code = check.applicant_resident_code
        applicant = await app.locate(applicant_code, WIDE_AREA_COPY)
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
            subject = await app.entry(home, subject_code, WIDE_AREA_COPY, request.issuing_municipality_code)
            same = (subject.household_id == applicant.household_id
                    and subject.status == common_pb2.RESIDENT_STATUS_CURRENT)
        except JukiError as error:
            if error.reason is not Reason.RESIDENT_NOT_FOUND:
                raise
            same = False
        if not same:
            # The refused attempt is recorded too, so the subject's disclosure shows it.
            try:
                await app.log_provision(provision(
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
    document_number = f"{request.issuing_municipality_code}-{app.today():%Y%m%d}-{uuid.uuid4().hex[:8].upper()}"
    record = provision(
        recipient_municipality=request.issuing_municipality_code, provider_municipality=home,
        resident_code=subject.resident_code, purpose=WIDE_AREA_COPY, purpose_name=WIDE_AREA_COPY_NAME,
        mode=common_pb2.QUERY_MODE_WIDE_AREA_COPY, fields=fields,
        operator_id=operator.operator_id if operator else "",
        reason=f"{WIDE_AREA_COPY_NAME} (本人確認: {method}; 申請者 {'本人' if subject is applicant else '同一世帯員'})",
    )
    await app.log_provision(record)
    if proof == "card_proof":
        async with app.db().acquire() as conn:
            await store.event(conn, request.card_proof.card_number, "wide_area_copy", document_number,
                              operator.operator_id if operator else "", peer.spiffe_id)
    response = card_pb2.RequestWideAreaCopyResponse(
        certificate=certificate, issued_by=request.issuing_municipality_code, document_number=document_number)
    response.issued_at.FromDatetime(now)
    return response

async def follow_move(app: CardBackend, card: StoredCard, left: municipal_pb2.ResidentEntry, peer: Peer
                      ) -> tuple[municipal_pb2.ResidentEntry, str]:
    """The holder moved (an ordinary 転出/転入 at the counters): from 2012-07-09 the card follows
    them to the new municipality; a move-in before that date made the card lapse."""
    try:
        arrived = await app.locate(left.resident_code, WIDE_AREA_COPY)
    except JukiError:
        return left, card.home_municipality  # moved abroad or not yet moved in: refused below
    moved_in = date_from_proto(arrived.became_resident_on, "became_resident_on", required=False) or app.today()
    new_home = arrived.address.municipality_code
    async with app.db().acquire() as conn, conn.transaction():
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
