"""Lookup by code and by the four items, through real mTLS, the 別表 policy and the real access log."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2
from juki.lookup.app import create
from juki.mesh.errors import from_grpc_error
from juki.mesh.settings import Peers

from tests.conftest import running
from tests.integration.lookup.conftest import Mesh, add_resident, ensure_municipality, fresh_code

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

PENSION = "B1-PENSION-BENEFIT"
PASSPORT = "B1-PASSPORT-ISSUANCE"


def details(error: grpc.aio.AioRpcError) -> tuple[str, list[str], float | None]:
    """(ErrorInfo reason, BadRequest fields, RetryInfo seconds) of a failed call."""
    remote = from_grpc_error(error)
    return remote.reason_name, [v.field for v in remote.violations], remote.retry_after_seconds


async def test_pension_service_looks_up_a_resident_by_code_and_the_provision_is_logged(mesh: Mesh) -> None:
    code = await add_resident(mesh.database, family_name="佐藤", given_name="花子", sex=2)
    stub = mesh.lookup_as("agency", "jps")
    response = await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
    record = response.record
    assert record.resident_code == code
    assert (record.name.family_name, record.name.given_name) == ("佐藤", "花子")
    assert (record.birth_date.year, record.birth_date.month, record.birth_date.day) == (1950, 4, 1)
    assert record.sex == common_pb2.SEX_FEMALE
    assert record.address.municipality_code == "131148"
    assert record.status == common_pb2.RESIDENT_STATUS_CURRENT
    assert record.HasField("as_of") and not record.stale
    assert set(response.provided_fields) == {1, 2, 3, 4, 5, 6}
    logged = await mesh.provisions(code)
    assert len(logged) == 1
    entry = logged[0].record
    assert entry.recipient == "spiffe://juki.local/agency/jps"
    assert entry.purpose == PENSION
    assert entry.query_mode == common_pb2.QUERY_MODE_BY_CODE
    assert entry.provider_tier == common_pb2.TIER_NATIONAL
    assert entry.provider == "spiffe://juki.local/service/lookup"
    assert set(entry.fields) == set(response.provided_fields)


async def test_fields_outside_the_grant_are_never_sent(mesh: Mesh) -> None:
    code = await add_resident(mesh.database)
    stub = mesh.lookup_as("agency", "mofa")
    response = await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PASSPORT, resident_code=code))
    record = response.record
    assert record.resident_code == ""  # the passport 事務 is not granted the resident code
    assert record.status == common_pb2.RESIDENT_STATUS_UNSPECIFIED  # nor the change information
    assert not record.HasField("last_changed_on")
    assert record.name.family_name == "山田"
    assert set(response.provided_fields) == {
        common_pb2.FIELD_NAME, common_pb2.FIELD_BIRTH_DATE, common_pb2.FIELD_SEX, common_pb2.FIELD_ADDRESS,
    }
    (entry,) = await mesh.provisions(code)
    assert common_pb2.FIELD_RESIDENT_CODE not in entry.record.fields


async def test_requested_fields_narrow_the_answer_and_a_field_outside_the_grant_is_refused(mesh: Mesh) -> None:
    code = await add_resident(mesh.database)
    jps = mesh.lookup_as("agency", "jps")
    narrow = await jps.LookupByCode(lookup_pb2.LookupByCodeRequest(
        purpose=PENSION, resident_code=code, requested_fields=[common_pb2.FIELD_CHANGE_INFO],
    ))
    assert not narrow.record.HasField("name") and narrow.record.status == common_pb2.RESIDENT_STATUS_CURRENT
    mofa = mesh.lookup_as("agency", "mofa")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mofa.LookupByCode(lookup_pb2.LookupByCodeRequest(
            purpose=PASSPORT, resident_code=code, requested_fields=[common_pb2.FIELD_RESIDENT_CODE],
        ))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details(refused.value)[0] == "FIELD_NOT_GRANTED"


async def test_a_private_body_is_refused_before_any_lookup_and_the_attempt_is_logged(mesh: Mesh) -> None:
    code = await add_resident(mesh.database)
    stub = mesh.lookup_as("private", "acme-insurance")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details(refused.value)[0] == "NOT_A_PUBLIC_BODY"
    assert await mesh.provisions(code) == []
    attempts = await mesh.provisions(code, include_refused=True)
    assert len(attempts) == 1
    assert attempts[0].record.outcome == accesslog_pb2.PROVISION_OUTCOME_REFUSED
    assert attempts[0].record.refusal_reason == common_pb2.ERROR_REASON_NOT_A_PUBLIC_BODY
    assert attempts[0].record.recipient == "spiffe://juki.local/private/acme-insurance"
    assert list(attempts[0].record.fields) == []


async def test_a_purpose_not_granted_to_the_caller_is_refused(mesh: Mesh) -> None:
    code = await add_resident(mesh.database)
    stub = mesh.lookup_as("agency", "mofa")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details(refused.value)[0] == "PURPOSE_NOT_GRANTED"
    with pytest.raises(grpc.aio.AioRpcError) as mode:
        await stub.VerifyBatch(iter([lookup_pb2.VerifyBatchRequest(
            purpose=PASSPORT, items=[lookup_pb2.VerifyItem(item_id=1, resident_code=code)])])).read()
    assert details(mode.value)[0] == "MODE_NOT_GRANTED"


@pytest.mark.parametrize(("code", "reason"), [
    ("", "INVALID_FIELD"), ("1234", "INVALID_FIELD"), ("2472705960X", "INVALID_FIELD"),
    ("24727059609", "CHECK_DIGIT_MISMATCH"),
])
async def test_a_malformed_code_is_invalid_argument_naming_the_field(mesh: Mesh, code: str, reason: str) -> None:
    stub = mesh.lookup_as("agency", "jps")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(refused.value)[:2] == (reason, ["resident_code"])


async def test_an_unknown_code_is_not_found(mesh: Mesh) -> None:
    stub = mesh.lookup_as("agency", "jps")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=fresh_code()))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_disconnected_municipality_marks_the_record_stale(mesh: Mesh) -> None:
    await ensure_municipality(mesh.database, "141003", connected=False)
    code = await add_resident(mesh.database, municipality_code="141003")
    stub = mesh.lookup_as("agency", "jps")
    response = await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
    assert response.record.stale


async def test_quota_answers_resource_exhausted_with_a_retry_hint(mesh: Mesh) -> None:
    code = await add_resident(mesh.database)
    # 2,000/s for 日本年金機構 scaled down to 2/s: the third call within a second is over quota.
    settings = mesh.lookup_settings(quota_multiplier=0.001)
    async with running(settings, create(settings)) as address:
        stub = mesh.lookup_as("agency", "jps", address)
        request = lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code)
        results = await asyncio.gather(*(stub.LookupByCode(request) for _ in range(4)), return_exceptions=True)
        refusals = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert refusals and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refusals)
        reason, _, retry = details(refusals[0])
        assert reason == "QUOTA_EXCEEDED" and retry is not None and 0 < retry <= 1.0


async def test_nothing_is_provided_when_the_access_log_is_unavailable(mesh: Mesh) -> None:
    code = await add_resident(mesh.database)
    settings = mesh.lookup_settings(ack_timeout_seconds=2)
    from dataclasses import replace

    settings = replace(settings, peers=Peers(accesslog="127.0.0.1:1"))
    async with running(settings, create(settings)) as address:
        stub = mesh.lookup_as("agency", "jps", address)
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details(unavailable.value)[0] == "ACCESS_LOG_UNAVAILABLE"
    assert await mesh.provisions(code) == []


async def test_search_by_four_items_tolerates_width_and_spacing_and_returns_every_candidate(mesh: Mesh) -> None:
    # Two people share name, birth date and sex; one more differs by birth date.
    given = "一郎" + fresh_code()[:4]  # unique per run: other tests' residents must not match
    first = await add_resident(mesh.database, family_name="髙橋", given_name=given, street="中野四丁目8番1号")
    second = await add_resident(mesh.database, family_name="高橋", given_name=given, street="中央三丁目5番2号")
    await add_resident(mesh.database, family_name="高橋", given_name=given, birth=(1951, 4, 1))
    stub = mesh.lookup_as("agency", "jps")
    full_width = "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isdigit() else c for c in given)
    request = lookup_pb2.SearchByFourItemsRequest(
        purpose=PENSION, name=f"高橋　{given}", birth_date=common_pb2.Date(year=1950, month=4, day=1),
        sex=common_pb2.SEX_MALE,
    )
    response = await stub.SearchByFourItems(request)
    assert sorted(c.resident_code for c in response.candidates) == sorted([first, second])
    request.name = f" 高橋 {full_width} "
    request.address = "中野4-8-1"
    narrowed = await stub.SearchByFourItems(request)
    assert [c.resident_code for c in narrowed.candidates] == [first]
    assert len(await mesh.provisions(first)) == 2
    assert len(await mesh.provisions(second)) == 1


async def test_search_without_a_birth_date_or_sex_names_each_missing_field(mesh: Mesh) -> None:
    stub = mesh.lookup_as("agency", "jps")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SearchByFourItems(lookup_pb2.SearchByFourItemsRequest(purpose=PENSION, name="山田太郎"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(details(refused.value)[1]) == {"birth_date", "sex"}


async def test_list_purposes_shows_the_callers_grants(mesh: Mesh) -> None:
    response = await mesh.lookup_as("agency", "jps").ListPurposes(lookup_pb2.ListPurposesRequest())
    assert response.recipient_name == "日本年金機構"
    codes = [grant.purpose for grant in response.grants]
    assert PENSION in codes and codes == sorted(codes)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.lookup_as("private", "acme-insurance").ListPurposes(lookup_pb2.ListPurposesRequest())
    assert details(refused.value)[0] == "NOT_A_PUBLIC_BODY"

