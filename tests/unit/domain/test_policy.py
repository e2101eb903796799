from __future__ import annotations

import pytest
from juki.domain.policy import (
    FieldNotGranted,
    IdentityField,
    ModeNotGranted,
    NotAPublicBody,
    Policy,
    PurposeNotGranted,
    QueryMode,
    UnknownRecipient,
    default_policy,
)

JPS = "spiffe://juki.local/agency/jps"
PASSPORT = "spiffe://juki.local/agency/mofa"
ACME = "spiffe://juki.local/private/acme-insurance"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.load()


def test_table_has_realistic_rows(policy: Policy) -> None:
    rows = [purpose for agency in policy.agencies for purpose in agency.purposes.values()]
    assert len(rows) >= 10
    assert all(purpose.schedule_row.startswith("別表第") for purpose in rows)
    assert default_policy() is default_policy()


@pytest.mark.parametrize("mode", list(QueryMode))
def test_pension_service_has_every_mode(policy: Policy, mode: QueryMode) -> None:
    grant = policy.authorise(JPS, "B1-PENSION-BENEFIT", mode)
    assert grant.agency.name == "日本年金機構"
    assert IdentityField.RESIDENT_CODE in grant.fields


def test_passport_office_by_code_but_no_change_feed(policy: Policy) -> None:
    grant = policy.authorise(PASSPORT, "B1-PASSPORT-ISSUANCE", QueryMode.BY_FOUR_ITEMS)
    assert IdentityField.CHANGE_INFO not in grant.fields
    with pytest.raises(ModeNotGranted):
        policy.authorise(PASSPORT, "B1-PASSPORT-ISSUANCE", QueryMode.CHANGE_FEED)


def test_purpose_of_another_agency_is_refused(policy: Policy) -> None:
    with pytest.raises(PurposeNotGranted) as refused:
        policy.authorise(PASSPORT, "B1-PENSION-BENEFIT", QueryMode.BY_CODE)
    assert refused.value.reason == "PURPOSE_NOT_GRANTED"


def test_public_body_without_rows_gets_nothing(policy: Policy) -> None:
    with pytest.raises(PurposeNotGranted):
        policy.authorise("spiffe://juki.local/agency/nta", "B1-PENSION-BENEFIT", QueryMode.BY_CODE)


def test_private_sector_is_never_served(policy: Policy) -> None:
    with pytest.raises(NotAPublicBody) as refused:
        policy.authorise(ACME, "B1-PENSION-BENEFIT", QueryMode.BY_CODE)
    assert not isinstance(refused.value, UnknownRecipient)
    assert policy.quota_per_second(ACME) == 0


def test_unknown_caller_is_not_a_public_body(policy: Policy) -> None:
    with pytest.raises(NotAPublicBody):
        policy.authorise("spiffe://evil.example/agency/jps", "B1-PENSION-BENEFIT", QueryMode.BY_CODE)
    with pytest.raises(UnknownRecipient):
        policy.authorise("spiffe://juki.local/municipality/", "B3-WIDE-AREA-COPY", QueryMode.BY_CODE)


def test_municipalities_match_the_prefix_row(policy: Policy) -> None:
    grant = policy.authorise(
        "spiffe://juki.local/municipality/131148", "B3-WIDE-AREA-COPY", QueryMode.BY_CODE
    )
    assert grant.agency_id.endswith("131148")


def test_field_filter_and_strict_check(policy: Policy) -> None:
    grant = policy.authorise(PASSPORT, "B1-PASSPORT-ISSUANCE", QueryMode.BY_CODE)
    requested = {IdentityField.NAME, IdentityField.RESIDENT_CODE, IdentityField.CHANGE_INFO}
    assert grant.filter_fields(requested) == {IdentityField.NAME}
    assert grant.filter_fields() == grant.fields
    with pytest.raises(FieldNotGranted) as refused:
        grant.require_fields(requested)
    assert refused.value.fields == {IdentityField.RESIDENT_CODE, IdentityField.CHANGE_INFO}
    assert grant.require_fields({IdentityField.NAME}) == {IdentityField.NAME}


def test_quota(policy: Policy) -> None:
    assert policy.quota_per_second(JPS) > policy.quota_per_second(PASSPORT) > 0
    assert policy.quota_per_second("spiffe://nobody") == 0


def test_table_refuses_rows_for_private_bodies() -> None:
    with pytest.raises(ValueError):
        Policy.from_dict(
            {
                "agencies": [
                    {
                        "identity": ACME,
                        "name": "x",
                        "public_body": False,
                        "quota_per_second": 1,
                        "purposes": [
                            {
                                "code": "X",
                                "name": "x",
                                "schedule_row": "別表第一",
                                "modes": ["BY_CODE"],
                                "fields": ["NAME"],
                            }
                        ],
                    }
                ]
            }
        )
