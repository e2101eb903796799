"""Security: callers that must not get in, and what they leave behind.

No certificate, a certificate of another CA and an expired certificate never complete the TLS handshake
(UNAVAILABLE at the client; no RPC runs). A revoked certificate, a private-sector identity, an agency asking
for a 事務 it lacks or for fields outside its grant, a replayed operator proof and a resident's card used for
another resident are refused with their own status and reason, and each refusal is recorded: a REFUSED record
in the access log (lookup, disclosure) or the refusing service's log (every service's interceptor). SQL-like
and path-like strings in every text field of every RPC are answered without a fault and change nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import symbol_database
from juki import domain
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.disclosure.v1 import disclosure_pb2, disclosure_pb2_grpc
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki._gen.juki.municipal.v1 import municipal_pb2_grpc
from juki.mesh.pki import CertificateAuthority
from juki.mesh.settings import TlsFiles
from juki.mesh.tls import secure_channel

from tests.faults import (
    NAKANO,
    PENSION,
    RECORD_CHANGE,
    Mesh,
    birth,
    call_raw,
    local_mesh,
    national_residents,
    provisions,
    refusal,
    refused_records,
    register_entries,
    serving,
)

pytestmark = pytest.mark.security

INSTANCES = ("intake-prefecture-13", "intake-national", "lookup", "accesslog", "disclosure", "card",
             f"municipal-{NAKANO}")
JPS = "spiffe://juki.local/agency/jps"
ATTACKS: Counter[str] = Counter()


@pytest.fixture(scope="module")
async def secure_mesh() -> AsyncIterator[Mesh]:
    async with local_mesh(40, prefix="juki-security-") as mesh:
        yield mesh
        print("SECURITY attacks " + str(dict(ATTACKS)))


def service_log(mesh: Mesh, instance: str) -> str:
    return (mesh.supervisor.data_dir / "run" / f"{instance}.log").read_text(errors="replace")


async def any_resident(mesh: Mesh) -> str:
    return (await national_residents(mesh, 1))[0].code


async def lookup_as(mesh: Mesh, tls: TlsFiles, request: lookup_pb2.LookupByCodeRequest) -> grpc.aio.AioRpcError:
    async with secure_channel(mesh.address("lookup"), tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lookup_pb2_grpc.LookupServiceStub(channel).LookupByCode(request, timeout=20)
    return caught.value


# -- the TLS layer ----------------------------------------------------------------------------------------

async def _refused_at_handshake(address: str, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        try:
            await serving(channel, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_no_certificate_another_ca_and_expired_certificates_never_get_a_session(secure_mesh: Mesh) -> None:
    mesh = secure_mesh
    ca_pem = mesh.ca.ca_cert_path.read_bytes()
    other_dir = tempfile.TemporaryDirectory(prefix="juki-other-ca-")
    other = CertificateAuthority(Path(other_dir.name))
    other.create(common_name="someone else's CA")
    foreign = other.issue("agency", "jps")
    foreign_cert, foreign_key = foreign.cert, foreign.key
    expired = mesh.ca.issue("agency", "expired-jps", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30),
                            days=1)
    not_yet = mesh.ca.issue("agency", "future-jps", not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=30))
    callers = {
        "no-certificate": grpc.ssl_channel_credentials(root_certificates=ca_pem),
        "another-ca": grpc.ssl_channel_credentials(ca_pem, foreign_key.read_bytes(), foreign_cert.read_bytes()),
        "expired": grpc.ssl_channel_credentials(ca_pem, expired.key.read_bytes(), expired.cert.read_bytes()),
        "not-yet-valid": grpc.ssl_channel_credentials(ca_pem, not_yet.key.read_bytes(),
                                                      not_yet.cert.read_bytes()),
    }
    other_dir.cleanup()  # the credentials are in memory now
    answered = []
    for instance in INSTANCES:
        for kind, credentials in callers.items():
            ATTACKS[kind] += 1
            code = await _refused_at_handshake(mesh.address(instance), credentials)
            if code is not grpc.StatusCode.UNAVAILABLE:
                answered.append(f"{instance} {kind}: {code.name}")
    assert not answered, answered
    # The same services still answer a good certificate.
    for instance in INSTANCES:
        assert await serving(mesh.channel(instance, "operator", "demo-operator"))


async def test_a_revoked_certificate_is_refused_and_recorded(secure_mesh: Mesh) -> None:
    mesh = secure_mesh
    code = await any_resident(mesh)
    tls = mesh.tls("agency", "revoked-jps")
    mesh.ca.revoke("agency", "revoked-jps")
    await asyncio.sleep(2.5)  # services re-read the CRL every 2 s
    error = await lookup_as(mesh, tls, lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
    ATTACKS["revoked"] += 1
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED and refusal(error).reason == "CERTIFICATE_REVOKED"
    for instance in INSTANCES:
        async with secure_channel(mesh.address(instance), tls) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_raw_or_raise(channel, instance)
        ATTACKS["revoked"] += 1
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, (instance, caught.value)
        assert "revoked" in service_log(mesh, instance), instance
    records = [r for r in await refused_records(mesh) if r.recipient == "spiffe://juki.local/agency/revoked-jps"]
    assert records and records[-1].refusal_reason == common_pb2.ERROR_REASON_CERTIFICATE_REVOKED


async def call_raw_or_raise(channel: grpc.aio.Channel, instance: str) -> None:
    """One real RPC of the instance's service (an empty request): raises the refusal."""
    service = {"intake": "juki.intake.v1.IntakeService/GetIntakeStatus",
               "lookup": "juki.lookup.v1.LookupService/ListPurposes",
               "accesslog": "juki.accesslog.v1.AccessLogService/GetCheckpoint",
               "disclosure": "juki.disclosure.v1.DisclosureService/GetDisclosure",
               "card": "juki.card.v1.CardService/GetCardStatus",
               "municipal": "juki.municipal.v1.MunicipalService/GetOutboxStatus"}[instance.split("-")[0]]
    await channel.unary_unary(f"/{service}")(b"", timeout=20)


# -- who may ask for what -----------------------------------------------------------------------------------

async def test_private_sector_never_reaches_a_resident_code(secure_mesh: Mesh) -> None:
    mesh = secure_mesh
    code = await any_resident(mesh)
    tls = mesh.tls("private", "acme-insurance")
    for purpose in (PENSION, "", "B1-PASSPORT-ISSUANCE"):
        ATTACKS["private-sector"] += 1
        error = await lookup_as(mesh, tls, lookup_pb2.LookupByCodeRequest(purpose=purpose, resident_code=code))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED, error
        assert refusal(error).reason in ("NOT_A_PUBLIC_BODY", "PEER_NOT_AUTHORISED"), refusal(error)
    async with secure_channel(mesh.address("lookup"), tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lookup_pb2_grpc.LookupServiceStub(channel).SearchByFourItems(lookup_pb2.SearchByFourItemsRequest(
                purpose=PENSION, name="山田　太郎", birth_date=common_pb2.Date(year=1950, month=1, day=1),
                sex=common_pb2.SEX_MALE), timeout=20)
    ATTACKS["private-sector"] += 1
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # Every other service refuses it too.
    for instance in INSTANCES:
        if instance == "lookup":
            continue
        async with secure_channel(mesh.address(instance), tls) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_raw_or_raise(channel, instance)
        ATTACKS["private-sector"] += 1
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED, (instance, caught.value)
        assert "acme-insurance" in service_log(mesh, instance), instance
    refused = [r for r in await refused_records(mesh) if r.recipient == "spiffe://juki.local/private/acme-insurance"]
    assert len(refused) >= 4
    assert all(r.resident_code == "" for r in refused)  # the pseudonym is not even computed for them


async def test_an_agency_is_held_to_its_purposes_and_fields(secure_mesh: Mesh) -> None:
    mesh = secure_mesh
    code = await any_resident(mesh)
    jps = mesh.tls("agency", "jps")
    # A 事務 of another agency.
    ATTACKS["purpose-not-granted"] += 1
    error = await lookup_as(mesh, jps, lookup_pb2.LookupByCodeRequest(purpose="B1-PASSPORT-ISSUANCE",
                                                                      resident_code=code))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED and refusal(error).reason == "PURPOSE_NOT_GRANTED"
    # A field the passport 事務 does not grant (the 住民票コード).
    mofa = mesh.tls("agency", "mofa")
    ATTACKS["field-not-granted"] += 1
    error = await lookup_as(mesh, mofa, lookup_pb2.LookupByCodeRequest(
        purpose="B1-PASSPORT-ISSUANCE", resident_code=code,
        requested_fields=[common_pb2.FIELD_NAME, common_pb2.FIELD_RESIDENT_CODE]))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED and refusal(error).reason == "FIELD_NOT_GRANTED"
    # Without asking for it, the passport office gets its grant and no more.
    async with secure_channel(mesh.address("lookup"), mofa) as channel:
        reply = await lookup_pb2_grpc.LookupServiceStub(channel).LookupByCode(
            lookup_pb2.LookupByCodeRequest(purpose="B1-PASSPORT-ISSUANCE", resident_code=code), timeout=20)
    assert reply.record.resident_code == "" and common_pb2.FIELD_RESIDENT_CODE not in reply.provided_fields
    logged = await provisions(mesh, code, include_refused=True)
    reasons = {(p.record.recipient, p.record.refusal_reason) for p in logged
               if p.record.outcome == accesslog_pb2.PROVISION_OUTCOME_REFUSED}
    assert (JPS, common_pb2.ERROR_REASON_PURPOSE_NOT_GRANTED) in reasons, reasons
    assert ("spiffe://juki.local/agency/mofa", common_pb2.ERROR_REASON_FIELD_NOT_GRANTED) in reasons, reasons


async def test_a_replayed_operator_proof_is_refused_and_logged(secure_mesh: Mesh) -> None:
    mesh = secure_mesh
    parent = (await register_entries(mesh, NAKANO, 1))[0]
    request = birth(parent, random.Random("replay"), domain.SystemClock().today())
    mesh.sign(request, RECORD_CHANGE)
    stub = municipal_pb2_grpc.MunicipalServiceStub(mesh.channel(f"municipal-{NAKANO}", "operator", "demo-operator"))
    await stub.RecordChange(request, timeout=30)
    # The same signed request again, and the same proof on another request.
    other = birth(parent, random.Random("replay-2"), domain.SystemClock().today())
    other.operator_proof.CopyFrom(request.operator_proof)
    for attempt in (request, other):
        ATTACKS["operator-replay"] += 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RecordChange(attempt, timeout=30)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, caught.value
        assert refusal(caught.value).reason in ("OPERATOR_PROOF_REPLAYED", "OPERATOR_PROOF_INVALID")
    assert refusal(caught.value).reason == "OPERATOR_PROOF_INVALID"  # the signature does not cover `other`
    log_text = service_log(mesh, f"municipal-{NAKANO}")
    assert "OPERATOR_PROOF_REPLAYED" in log_text and "OPERATOR_PROOF_INVALID" in log_text


async def seed_card(mesh: Mesh, resident_code: str, pin: str) -> str:
    from juki.card import rules, store

    today = domain.SystemClock().today()
    salt, digest = rules.hash_pin(pin)
    card = store.StoredCard(
        card_number=store.new_card_number(), resident_code=resident_code, card_type=1, resident_kind=1,
        state=rules.ACTIVE, state_before_suspension=None, failed_pin_attempts=0, pin_salt=salt, pin_hash=digest,
        issued_on=today - dt.timedelta(days=30), expires_on=today + dt.timedelta(days=3000),
        issuing_municipality=NAKANO, home_municipality=NAKANO, revoked_reason="",
        state_changed_at=dt.datetime.now(dt.UTC),
    )
    conn = await mesh.admin()
    try:
        await conn.execute("SET search_path TO card")
        await store.insert(conn, card, None)
    finally:
        await conn.close()
    return card.card_number


async def test_a_resident_card_opens_no_one_elses_disclosure(secure_mesh: Mesh) -> None:
    mesh = secure_mesh
    a, b = [r.code for r in await national_residents(mesh, 2, NAKANO)]
    card_a = await seed_card(mesh, a, "1234")
    stub = disclosure_pb2_grpc.DisclosureServiceStub(mesh.channel("disclosure", "municipality", NAKANO))
    mine = await stub.GetDisclosure(disclosure_pb2.GetDisclosureRequest(
        resident_code=a, card_proof=common_pb2.CardProof(card_number=card_a, pin="1234")), timeout=30)
    assert mine.identity.resident_code == a
    ATTACKS["other-residents-disclosure"] += 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDisclosure(disclosure_pb2.GetDisclosureRequest(
            resident_code=b, card_proof=common_pb2.CardProof(card_number=card_a, pin="1234")), timeout=30)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED, caught.value
    assert b not in (caught.value.details() or "")
    refused = [p for p in await provisions(mesh, b, include_refused=True)
               if p.record.outcome == accesslog_pb2.PROVISION_OUTCOME_REFUSED]
    refused += [p for p in await provisions(mesh, a, include_refused=True)
                if p.record.outcome == accesslog_pb2.PROVISION_OUTCOME_REFUSED]
    assert refused, "the refused disclosure left no record"


# -- hostile text in every field ------------------------------------------------------------------------------

HOSTILE = ["'; DROP TABLE residents; --", "' OR 1=1 --", "\"; SELECT pg_sleep(10); --", "../../../../etc/passwd",
           "..%2f..%2fetc%2fshadow", "/dev/zero", "C:\\Windows\\system32", "${jndi:ldap://x}", "{{schema}}",
           "%s%s%s%n", "\x00\x01", "<script>alert(1)</script>"]


def _string_paths(descriptor: Any, prefix: str = "", depth: int = 0) -> list[str]:
    paths = []
    for f in descriptor.fields:
        repeated = bool(getattr(f, "is_repeated", False) or getattr(f, "label", 0) == 3)
        if f.type == _descriptor.FieldDescriptor.TYPE_STRING and not repeated:
            paths.append(prefix + f.name)
        elif (f.type == _descriptor.FieldDescriptor.TYPE_MESSAGE and not repeated and depth < 2
              and f.message_type.full_name != "juki.common.v1.OperatorProof"):
            paths += _string_paths(f.message_type, prefix + f.name + ".", depth + 1)
    return paths


def _set(message: Any, path: str, value: str) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        message = getattr(message, name)
    setattr(message, leaf, value)


async def test_sql_and_path_strings_in_every_text_field_fault_nothing(secure_mesh: Mesh) -> None:
    from tests.fuzz.test_fuzz import RPCS, caller_for

    mesh = secure_mesh
    conn = await mesh.admin()
    try:
        before = await conn.fetchval("SELECT count(*) FROM intake_national.residents")
    finally:
        await conn.close()
    faults = []
    tried = 0
    for rpc in RPCS:
        channel = await caller_for(mesh, rpc)
        cls: Any = symbol_database.Default().GetSymbol(rpc.method.input_type.full_name)
        for path in _string_paths(cls.DESCRIPTOR):
            for text in HOSTILE:
                message = cls()
                _set(message, path, text)
                if "operator_proof" in cls.DESCRIPTOR.fields_by_name:
                    mesh.sign(message, rpc.path)
                code, details = await call_raw(channel, rpc.path, message.SerializeToString(),
                                               client_stream=rpc.method.client_streaming,
                                               server_stream=rpc.method.server_streaming, timeout=30)
                tried += 1
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) or (
                        code is grpc.StatusCode.INVALID_ARGUMENT and not (details and details.fields)):
                    faults.append(f"{rpc} {path}={text!r}: {code.name} {details}")
    ATTACKS["hostile-text"] += tried
    assert tried > 500
    assert not faults, faults[:10]
    conn = await mesh.admin()
    try:
        after = await conn.fetchval("SELECT count(*) FROM intake_national.residents")
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 'residents'")
    finally:
        await conn.close()
    assert after >= before and tables >= 3
    for instance in INSTANCES:
        assert await serving(mesh.channel(instance, "operator", "demo-operator")), instance
