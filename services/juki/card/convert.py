"""Conversions and request checks shared by the card servicer and the wide-area copy."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from juki import domain
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.card.v1 import card_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki.card import rules
from juki.card.store import StoredCard
from juki.mesh.errors import Reason, invalid
from juki.mesh.settings import SPIFFE_TRUST_DOMAIN

# Photo identity documents accepted in person (release of a suspension, a wide-area copy without a card).
PHOTO_DOCUMENTS = frozenset({"passport", "driving_licence", "card_type_b", "residence_card",
                             "disability_certificate", "my_number_card"})


def date_from_proto(value: common_pb2.Date, field: str, *, required: bool = True) -> dt.date | None:
    if value.year == 0 and value.month == 0 and value.day == 0:
        if required:
            raise invalid(field, f"{field} is required")
        return None
    try:
        return dt.date(value.year, value.month, value.day)
    except ValueError:
        raise invalid(field, f"{field} is not a valid date") from None


def date_to_proto(day: dt.date) -> common_pb2.Date:
    return common_pb2.Date(year=day.year, month=day.month, day=day.day, precision=common_pb2.DATE_PRECISION_FULL)


def check_municipality(code: str, field: str) -> None:
    if not (len(code) == 6 and code.isdigit()):
        raise invalid(field, f"{field} must be a 6-digit local-government code")
    if not domain.is_valid_local_government_code(code):
        raise invalid(field, f"{field} {code} fails the check digit", Reason.CHECK_DIGIT_MISMATCH)
    if not domain.is_municipality(code):
        raise invalid(field, f"{field} {code} is not a municipality", Reason.UNKNOWN_MUNICIPALITY)


def municipality_id(code: str) -> str:
    """The SPIFFE id of a municipality's CS, the recipient or provider named in an access-log record."""
    return f"spiffe://{SPIFFE_TRUST_DOMAIN}/municipality/{code}"


def provision(*, recipient_municipality: str, provider_municipality: str, resident_code: str, purpose: str,
              purpose_name: str, mode: int, fields: Sequence[int], operator_id: str, reason: str,
              refused: Reason | None = None) -> accesslog_pb2.ProvisionRecord:
    """An access-log record of information one municipality's register gave (or refused) another."""
    place = domain.municipality(recipient_municipality)
    record = accesslog_pb2.ProvisionRecord(
        recipient=municipality_id(recipient_municipality),
        recipient_name=place.full_name if place else recipient_municipality,
        purpose=purpose, purpose_name=purpose_name, query_mode=mode,  # type: ignore[arg-type]
        provider_tier=common_pb2.TIER_MUNICIPALITY, provider=municipality_id(provider_municipality),
        fields=[] if refused else fields,  # type: ignore[arg-type]
        resident_code=resident_code, operator_id=operator_id, reason=reason,
        outcome=accesslog_pb2.PROVISION_OUTCOME_REFUSED if refused else accesslog_pb2.PROVISION_OUTCOME_PROVIDED,
    )
    if refused is not None:
        record.refusal_reason = common_pb2.ErrorReason.ValueType(refused.number)
    record.provided_at.GetCurrentTime()
    return record


def card_message(card: StoredCard, today: dt.date) -> card_pb2.Card:
    message = card_pb2.Card(
        card_number=card.card_number, resident_code=card.resident_code,
        card_type=card.card_type,  # type: ignore[arg-type]
        state=rules.effective_state(card.facts, today),  # type: ignore[arg-type]
        issued_on=date_to_proto(card.issued_on), expires_on=date_to_proto(card.expires_on),
        failed_pin_attempts=card.failed_pin_attempts, issuing_municipality_code=card.issuing_municipality,
    )
    message.state_changed_at.FromDatetime(card.state_changed_at)
    return message
