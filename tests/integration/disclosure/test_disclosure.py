"""Disclosure against a real national intake and a real access log, over mTLS, with counter-operator proofs."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.disclosure.v1 import disclosure_pb2, disclosure_pb2_grpc
from juki.accesslog.app import create as create_accesslog
from juki.disclosure.app import create as create_disclosure
from juki.disclosure.service import METHOD
from juki.domain import generate_resident_code
from juki.mesh.pki import CertificateAuthority
from juki.mesh.settings import Peers

from tests.conftest import channel_as, running
from tests.integration.accesslog.conftest import fresh_instance, provision

pytestmark = pytest.mark.timeout(120)


@dataclass
class Mesh:
    disclosure: str
    accesslog: str
    ca: Any
    channels: list[grpc.aio.Channel]
    intake: str = ""

    def stub(self, kind: str = "operator", name: str = "demo-operator") -> disclosure_pb2_grpc.DisclosureServiceStub:
        channel = channel_as(self.ca, kind, name, self.disclosure)
        self.channels.append(channel)
        return disclosure_pb2_grpc.DisclosureServiceStub(channel)

    def log(self, kind: str = "service", name: str = "lookup") -> accesslog_pb2_grpc.AccessLogServiceStub:
        channel = channel_as(self.ca, kind, name, self.accesslog)
        self.channels.append(channel)
        return accesslog_pb2_grpc.AccessLogServiceStub(channel)


class MethodNamesOnly:
    """Serve another service with its access table keyed by bare method names, as ServiceBinding wants."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def start(self) -> list[Any]:
        from dataclasses import replace

        return [replace(b, access={k.rsplit("/", 1)[-1]: v for k, v in b.access.items()})
                for b in await self.inner.start()]

    async def stop(self) -> None:
        await self.inner.stop()


@pytest.fixture
async def mesh(settings_factory: Any, database: Any, ca: Any) -> AsyncIterator[Mesh]:
    from juki.intake.app import create as create_intake

    log_instance = await fresh_instance(database)
    base = settings_factory("accesslog", log_instance, ("service", "accesslog"))
    log_settings = settings_factory("accesslog", log_instance, ("service", "accesslog"),
                                    accesslog=dataclasses.replace(base.accesslog, checkpoint_seconds=0,
                                                                  verify_seconds=0))
    intake_settings = settings_factory("intake", "intake-national", ("service", "intake-national"), tier="national")
    async with contextlib.AsyncExitStack() as stack:
        log_address = await stack.enter_async_context(running(log_settings, create_accesslog(log_settings)))
        intake_address = await stack.enter_async_context(
            running(intake_settings, MethodNamesOnly(create_intake(intake_settings))))
        settings = settings_factory("disclosure", "disclosure", ("service", "disclosure"),
                                    peers=Peers(accesslog=log_address, national_intake=intake_address))
        address = await stack.enter_async_context(running(settings, create_disclosure(settings)))
        found = Mesh(address, log_address, ca, [], intake_address)
        yield found
        for channel in found.channels:
            await channel.close()


async def seed_resident(database: Any, rng: random.Random) -> str:
    """A resident in the national store, with two versions of its record (as intake would store them)."""
    code = generate_resident_code(rng)
    record = common_pb2.IdentityRecord(
        resident_code=code, resident_kind=common_pb2.RESIDENT_KIND_JAPANESE,
        name=common_pb2.PersonName(family_name="山田", given_name="花子", family_name_kana="ヤマダ",
                                   given_name_kana="ハナコ"),
        birth_date=common_pb2.Date(year=1980, month=4, day=1, precision=common_pb2.DATE_PRECISION_FULL),
        sex=common_pb2.SEX_FEMALE,
        address=common_pb2.Address(municipality_code="131148", prefecture="東京都", municipality="中野区",
                                   street="中野四丁目8番1号"),
        status=common_pb2.RESIDENT_STATUS_CURRENT, version=2,
    )
    conn = await database.admin()
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO intake_national.residents (resident_code, resident_kind, family_name, given_name,"
                " family_name_kana, given_name_kana, birth_year, birth_month, birth_day, sex, municipality_code,"
                " prefecture, municipality, street, status, last_change_kind, version)"
                " VALUES ($1, 1, '山田', '花子', 'ヤマダ', 'ハナコ', 1980, 4, 1, 2, '131148', '東京都', '中野区',"
                " '中野四丁目8番1号', 1, 8, 2)",
                code,
            )
            for version, kind in ((1, common_pb2.CHANGE_KIND_BIRTH), (2, common_pb2.CHANGE_KIND_ADDRESS_CHANGE)):
                await conn.execute(
                    "INSERT INTO intake_national.resident_versions (resident_code, version, change_kind, occurred_on,"
                    " notified_on, record) VALUES ($1, $2, $3, $4::date, $4::date, $5)",
                    code, version, kind, dt.date(1980 + version * 20, 4, 1),
                    record.SerializeToString(),
                )
    finally:
        await conn.close()
    return code


def signed(code: str, ca: Any, **fields: Any) -> disclosure_pb2.GetDisclosureRequest:
    from juki.mesh.operator import sign_operator_proof

    request = disclosure_pb2.GetDisclosureRequest(resident_code=code, **fields)
    cert, key = ca.paths("operator", "demo-operator")
    sign_operator_proof(request, METHOD, cert_pem=cert.read_bytes(), key_pem=key.read_bytes(), password="demo",
                        proof_field="counter_operator")
    return request


async def test_counter_disclosure_shows_record_history_provisions_and_integrity(mesh: Mesh, database: Any) -> None:
    rng = random.Random(501)
    me = await seed_resident(database, rng)
    someone_else = await seed_resident(database, rng)
    base = 1_704_034_800  # 2024-01-01 JST
    await mesh.log().Append(accesslog_pb2.AppendRequest(records=[
        provision(me, seconds=base + 86_400 * i, purpose=f"P{i}") for i in range(5)
    ] + [provision(someone_else, seconds=base, purpose="OTHER")]))
    reply = await mesh.stub().GetDisclosure(signed(me, mesh.ca))
    assert reply.identity.resident_code == me and reply.identity.name.family_name == "山田"
    assert [h.version for h in reply.history] == [1, 2]
    assert reply.history[0].change_kind == common_pb2.CHANGE_KIND_BIRTH
    purposes = [p.purpose for p in reply.provisions]
    assert purposes[0] == "DISCLOSURE"  # the disclosure itself is logged first and shows up
    assert purposes[1:] == ["P4", "P3", "P2", "P1", "P0"]
    assert "OTHER" not in purposes
    first = reply.provisions[1]
    assert first.recipient_name == "日本年金機構" and first.reason == "年金受給者の現況確認"
    assert first.query_mode == common_pb2.QUERY_MODE_BY_CODE and list(first.fields) == [2, 5]
    assert reply.integrity.chain_verified and reply.integrity.checkpoint_sequence >= 6
    assert reply.integrity.records_checked >= 7
    # The verification reached every provision it vouches for, the disclosure's own record included.
    assert reply.integrity.verified_through_sequence >= max(p.sequence for p in reply.provisions)


async def test_date_filter_and_pages(mesh: Mesh, database: Any) -> None:
    me = await seed_resident(database, random.Random(502))
    base = 1_704_034_800
    await mesh.log().Append(accesslog_pb2.AppendRequest(records=[
        provision(me, seconds=base + 86_400 * i, purpose=f"P{i:02d}") for i in range(12)
    ]))
    seen: list[str] = []
    token = ""
    while True:
        reply = await mesh.stub().GetDisclosure(signed(
            me, mesh.ca, page_size=4, page_token=token,
            from_date=common_pb2.Date(year=2024, month=1, day=3), to_date=common_pb2.Date(year=2024, month=1, day=10)))
        seen += [p.purpose for p in reply.provisions]
        token = reply.next_page_token
        if not token:
            break
    assert seen == [f"P{i:02d}" for i in range(9, 1, -1)]


async def test_refusals(mesh: Mesh, database: Any) -> None:
    me = await seed_resident(database, random.Random(503))
    stub = mesh.stub()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDisclosure(disclosure_pb2.GetDisclosureRequest(resident_code=me))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDisclosure(signed(me[:-1] + str((int(me[-1]) + 1) % 10), mesh.ca))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A proof signed for one resident cannot be reused for another (the signature covers the request).
    request = signed(me, mesh.ca)
    other = await seed_resident(database, random.Random(504))
    request.resident_code = other
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDisclosure(request)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Replay of a good proof is refused.
    good = signed(me, mesh.ca)
    await stub.GetDisclosure(good)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDisclosure(good)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Agencies and private companies may not ask for disclosures at all.
    for kind, name in (("agency", "jps"), ("private", "acme-insurance")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.stub(kind, name).GetDisclosure(signed(me, mesh.ca))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Bad dates name the field.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDisclosure(signed(me, mesh.ca, from_date=common_pb2.Date(year=2024, month=13, day=1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def endpoints_for(tmp: Path, mesh: Mesh) -> Path:
    """An endpoints.json naming the in-process services, as `juki up` writes it."""
    cert, key = mesh.ca.paths("operator", "demo-operator")
    (tmp / "endpoints.json").write_text(json.dumps({
        "ca": str(mesh.ca.ca_cert_path),
        "services": {"disclosure": {"address": mesh.disclosure}, "accesslog": {"address": mesh.accesslog}},
        "clients": {"operator": {"spiffe_id": "spiffe://juki.local/operator/demo-operator",
                                 "cert": str(cert), "key": str(key)}},
    }))
    return tmp


@pytest.mark.parametrize("fmt", ["text", "json", "html", "pdf"])
async def test_juki_disclose_documents(mesh: Mesh, database: Any, fmt: str, tmp_path: Path) -> None:
    from juki.cli.disclose import cmd_disclose
    from juki.cli.main import build_parser

    me = await seed_resident(database, random.Random(f"disclose-{fmt}"))
    copy = provision(me, purpose="B4-WIDE-AREA-COPY")
    copy.query_mode = common_pb2.QUERY_MODE_WIDE_AREA_COPY
    copy.recipient, copy.recipient_name = "spiffe://juki.local/municipality/141003", "横浜市"
    copy.provider = "spiffe://juki.local/service/card"
    await mesh.log().Append(accesslog_pb2.AppendRequest(records=[provision(me, purpose="B1-PENSION-BENEFIT"), copy]))
    data_dir = endpoints_for(tmp_path, mesh)
    out = tmp_path / f"disclosure.{fmt}"
    args = build_parser().parse_args(["disclose", me, "--data-dir", str(data_dir), "--format", fmt,
                                      "--out", str(out), "--page-size", "1"])
    assert await cmd_disclose(args) == 0
    content = out.read_bytes()
    if fmt == "pdf":
        assert content.startswith(b"%PDF") and len(content) > 2000
        # The Japanese font travels in the file (a TrueType subset): it prints without fonts on the reader.
        assert b"/FontFile2" in content and b"IPAexGothic" in content and b"Heisei" not in content
        return
    text = content.decode()
    for label in ("本人確認情報", "提供年月日", "機能区分", "提供事務区分", "提供先", "日本年金機構", "山田",
                  "住民票の写しの広域交付", "横浜市"):
        assert label in text, label
    assert "本人開示" in text  # the disclosure itself is listed (paged through, page size 1)
    if fmt == "json":
        document = json.loads(text)
        assert len(document["提供状況"]) == 3 and document["完全性"]["検証結果"] == "検証済み"
    else:
        assert "検証済み" in text and "チェックポイント" in text


async def proof_verify(path: Path, ca: Path) -> tuple[int, str]:
    """`juki proof verify FILE --ca CA` as a real process: offline, nothing but the file and the CA."""
    import asyncio
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", "proof", "verify", str(path), "--ca", str(ca),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None, err.decode()
    return process.returncode, out.decode() + err.decode()


async def test_disclosure_proofs_verify_offline_and_a_tampered_field_is_named(
    mesh: Mesh, database: Any, tmp_path: Path
) -> None:
    from juki.cli.disclose import cmd_disclose
    from juki.cli.main import build_parser

    me = await seed_resident(database, random.Random("offline-proof"))
    await mesh.log().Append(accesslog_pb2.AppendRequest(records=[
        provision(me, purpose="B1-PENSION-BENEFIT", seconds=1_704_034_800 + i) for i in range(3)]))
    await mesh.log().Append(accesslog_pb2.AppendRequest(records=[  # others' records grow the tree around mine
        provision(code) for code in (generate_resident_code(random.Random(i)) for i in range(40))]))
    out = tmp_path / "disclosure.json"
    args = build_parser().parse_args(["disclose", me, "--data-dir", str(endpoints_for(tmp_path, mesh)),
                                      "--format", "json", "--out", str(out), "--page-size", "2"])
    assert await cmd_disclose(args) == 0
    document = json.loads(out.read_text())
    assert len(document["提供状況"]) == 4
    assert len(document["透明性ログ"]["checkpoints"]) >= 2  # each page is proven into its own checkpoint
    code, output = await proof_verify(out, mesh.ca.ca_cert_path)
    assert code == 0, output
    assert "4 provision(s)" in output

    def tampered(change: Any) -> Path:
        copy = json.loads(out.read_text())
        change(copy)
        path = tmp_path / f"tampered-{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(copy, ensure_ascii=False))
        return path

    def flip(text: str) -> str:
        raw = bytearray(base64.b64decode(text))
        raw[-1] ^= 1
        return base64.b64encode(bytes(raw)).decode()

    cases: list[tuple[Any, str]] = [
        (lambda d: d["提供状況"][1].__setitem__("提供先", "株式会社どこか"), "提供状況[1].提供先"),
        (lambda d: d["提供状況"][2].__setitem__("利用事由", "別の事由"), "提供状況[2].利用事由"),
        (lambda d: d["提供状況"][3].__setitem__("記録番号", 999), "提供状況[3].記録番号"),
        (lambda d: d["提供状況"][0]["透明性ログの証明"]["inclusion_proof"].__setitem__(
            0, flip(d["提供状況"][0]["透明性ログの証明"]["inclusion_proof"][0])), "提供状況[0].透明性ログの証明"),
        (lambda d: d["提供状況"][1]["透明性ログの証明"].__setitem__(
            "leaf", flip(d["提供状況"][1]["透明性ログの証明"]["leaf"])), "提供状況[1]"),
        (lambda d: d["透明性ログ"]["checkpoints"].__setitem__(
            0, d["透明性ログ"]["checkpoints"][0].replace("\n", "\n1", 1)), "透明性ログ.checkpoints[0]"),
        (lambda d: d["透明性ログ"].__setitem__(
            "signing_certificate", mesh.ca.paths("operator", "demo-operator")[0].read_text()),
         "透明性ログ.signing_certificate"),
    ]
    for change, named in cases:
        code, output = await proof_verify(tampered(change), mesh.ca.ca_cert_path)
        assert code == 1 and f"proof FAILED: {named}" in output, (named, output)


@pytest.fixture
async def card_mesh(settings_factory: Any, database: Any, ca: Any) -> AsyncIterator[tuple[Mesh, str]]:
    """The mesh above plus a real card service (business clock in 2010, while cards were issued)."""
    from juki.card.app import create as create_card
    from juki.intake.app import create as create_intake

    log_instance = await fresh_instance(database)
    base = settings_factory("accesslog", log_instance, ("service", "accesslog"))
    log_settings = settings_factory("accesslog", log_instance, ("service", "accesslog"),
                                    accesslog=dataclasses.replace(base.accesslog, checkpoint_seconds=0,
                                                                  verify_seconds=0))
    intake_settings = settings_factory("intake", "intake-national", ("service", "intake-national"), tier="national")
    async with contextlib.AsyncExitStack() as stack:
        log_address = await stack.enter_async_context(running(log_settings, create_accesslog(log_settings)))
        intake_address = await stack.enter_async_context(
            running(intake_settings, MethodNamesOnly(create_intake(intake_settings))))
        card_settings = settings_factory("card", "card", ("service", "card"), clock="2010-06-01",
                                         peers=Peers(accesslog=log_address))
        card_address = await stack.enter_async_context(running(card_settings, create_card(card_settings)))
        settings = settings_factory("disclosure", "disclosure", ("service", "disclosure"),
                                    peers=Peers(accesslog=log_address, national_intake=intake_address,
                                                card=card_address))
        address = await stack.enter_async_context(running(settings, create_disclosure(settings)))
        found = Mesh(address, log_address, ca, [])
        yield found, card_address
        for channel in found.channels:
            await channel.close()


async def seed_card(database: Any, resident_code: str, pin: str) -> str:
    from juki.card import rules, store

    salt, digest = rules.hash_pin(pin)
    card = store.StoredCard(
        card_number=store.new_card_number(), resident_code=resident_code, card_type=1, resident_kind=1,
        state=rules.ACTIVE, state_before_suspension=None, failed_pin_attempts=0, pin_salt=salt, pin_hash=digest,
        issued_on=dt.date(2009, 4, 1), expires_on=dt.date(2019, 4, 1), issuing_municipality="131148",
        home_municipality="131148", revoked_reason="", state_changed_at=dt.datetime(2009, 4, 1, tzinfo=dt.UTC),
    )
    conn = await database.admin()
    try:
        await conn.execute("SET search_path TO card")
        await store.insert(conn, card, None)
    finally:
        await conn.close()
    return card.card_number


async def test_card_and_pin_disclosure(card_mesh: tuple[Mesh, str], database: Any) -> None:
    mesh, _ = card_mesh
    rng = random.Random("card-path")
    me, other = await seed_resident(database, rng), await seed_resident(database, rng)
    my_card, other_card = await seed_card(database, me, "1234"), await seed_card(database, other, "4321")
    stub = mesh.stub()
    reply = await stub.GetDisclosure(disclosure_pb2.GetDisclosureRequest(
        resident_code=me, card_proof=common_pb2.CardProof(card_number=my_card, pin="1234")))
    assert reply.identity.resident_code == me
    assert reply.provisions[0].query_mode == common_pb2.QUERY_MODE_DISCLOSURE
    assert "住基カード" in reply.provisions[0].reason
    # Wrong PIN: refused, nothing disclosed.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDisclosure(disclosure_pb2.GetDisclosureRequest(
            resident_code=me, card_proof=common_pb2.CardProof(card_number=my_card, pin="0000")))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Someone else's card, even with its right PIN, never reaches my records (nor theirs through mine).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDisclosure(disclosure_pb2.GetDisclosureRequest(
            resident_code=me, card_proof=common_pb2.CardProof(card_number=other_card, pin="4321")))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetDisclosure(disclosure_pb2.GetDisclosureRequest(
            resident_code=me, card_proof=common_pb2.CardProof(card_number=my_card, pin="12a4")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The two failed proofs are security events on my record, visible with the refused attempts.
    listed = await mesh.log("service", "disclosure").ListProvisions(accesslog_pb2.ListProvisionsRequest(
        resident_code=me, include_refused=True))
    refused = [p.record for p in listed.provisions if p.record.outcome == accesslog_pb2.PROVISION_OUTCOME_REFUSED]
    assert [r.refusal_reason for r in refused] == [common_pb2.ERROR_REASON_PEER_NOT_AUTHORISED,
                                                   common_pb2.ERROR_REASON_PIN_MISMATCH]
    assert all(r.query_mode == common_pb2.QUERY_MODE_DISCLOSURE and not r.fields for r in refused)


async def test_provisions_under_an_earlier_code_are_disclosed_too(mesh: Mesh, database: Any) -> None:
    """After a 住民票コード変更 the resident's provisions under the retired code still belong to them."""
    rng = random.Random("code-change")
    me = await seed_resident(database, rng)
    old = generate_resident_code(rng)
    stranger = await seed_resident(database, rng)
    retired = common_pb2.IdentityRecord(resident_code=old, status=common_pb2.RESIDENT_STATUS_CODE_RETIRED,
                                        successor_code=me, version=1)
    conn = await database.admin()
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO intake_national.residents (resident_code, resident_kind, municipality_code, status,"
                " successor_code, version) VALUES ($1, 1, '131148', 5, $2, 1)", old, me)
            await conn.execute("UPDATE intake_national.residents SET predecessor_code = $1 WHERE resident_code = $2",
                               old, me)
            await conn.execute(
                "INSERT INTO intake_national.resident_versions (resident_code, version, change_kind, occurred_on,"
                " notified_on, record) VALUES ($1, 1, 11, '2015-01-05', '2015-01-05', $2)",
                old, retired.SerializeToString())
    finally:
        await conn.close()
    base = 1_704_034_800
    await mesh.log().Append(accesslog_pb2.AppendRequest(records=[
        provision(old, seconds=base, purpose="UNDER-OLD"), provision(me, seconds=base + 86_400, purpose="UNDER-NEW"),
        provision(stranger, seconds=base + 2 * 86_400, purpose="STRANGER"),
    ]))
    reply = await mesh.stub().GetDisclosure(signed(me, mesh.ca))
    listed = [(p.purpose, p.resident_code) for p in reply.provisions if p.purpose != "DISCLOSURE"]
    assert listed == [("UNDER-NEW", me), ("UNDER-OLD", old)]


async def test_counter_operator_password_is_checked_when_configured(
    mesh: Mesh, database: Any, settings_factory: Any, tmp_path: Path
) -> None:
    from juki.mesh.operator import hash_operator_password, sign_operator_proof

    passwords = tmp_path / "operators.json"
    passwords.write_text(json.dumps({"demo-operator": hash_operator_password("窓口-secret")}))
    settings = settings_factory("disclosure", "disclosure", ("service", "disclosure"),
                                peers=Peers(accesslog=mesh.accesslog, national_intake=mesh.intake),
                                operator_passwords_file=passwords)
    me = await seed_resident(database, random.Random("password"))
    cert, key = mesh.ca.paths("operator", "demo-operator")
    async with running(settings, create_disclosure(settings)) as address:
        channel = channel_as(mesh.ca, "operator", "demo-operator", address)
        stub = disclosure_pb2_grpc.DisclosureServiceStub(channel)
        try:
            for password, expected in (("wrong", grpc.StatusCode.UNAUTHENTICATED), ("窓口-secret", None)):
                request = disclosure_pb2.GetDisclosureRequest(resident_code=me)
                sign_operator_proof(request, METHOD, cert_pem=cert.read_bytes(), key_pem=key.read_bytes(),
                                    password=password, proof_field="counter_operator")
                if expected is None:
                    assert (await stub.GetDisclosure(request)).identity.resident_code == me
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.GetDisclosure(request)
                    assert caught.value.code() == expected
        finally:
            await channel.close()


async def test_provisions_a_witness_cosigned_are_proven_into_its_checkpoint(
    mesh: Mesh, database: Any, tmp_path: Path, capsys: Any
) -> None:
    import argparse

    from juki.cli.audit import cmd_witness
    from juki.cli.disclose import cmd_disclose
    from juki.cli.main import build_parser

    me = await seed_resident(database, random.Random("witnessed-proof"))
    await mesh.log().Append(accesslog_pb2.AppendRequest(records=[
        provision(me, purpose="B1-PENSION-BENEFIT", seconds=1_704_034_800 + i) for i in range(2)]))
    await mesh.log().Append(accesslog_pb2.AppendRequest(records=[
        provision(code) for code in (generate_resident_code(random.Random(i)) for i in range(30))]))
    assert await cmd_witness(argparse.Namespace(
        data_dir=tmp_path, name="w1", address=mesh.accesslog, ca=None, pki=mesh.ca.root,
        state=tmp_path / "w1.json", origin="juki.local/accesslog", every=0, json=True)) == 0
    witnessed_size = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tree_size"]
    out = tmp_path / "disclosure.json"
    args = build_parser().parse_args(["disclose", me, "--data-dir", str(endpoints_for(tmp_path, mesh)),
                                      "--format", "json", "--out", str(out)])
    assert await cmd_disclose(args) == 0
    document = json.loads(out.read_text())
    sizes = [p["透明性ログの証明"]["tree_size"] for p in document["提供状況"]]
    # The two pension provisions are in the cosigned tree and proven into it; the disclosure's own record,
    # newer, into the latest checkpoint.
    assert sizes.count(witnessed_size) == 2 and len(sizes) == 3 and max(sizes) > witnessed_size
    assert len(document["透明性ログ"]["witness_certificates"]) == 1
    assert f"証人（w1）が連署したチェックポイント（木のサイズ{witnessed_size}）" in document["完全性"]["説明"]
    code, output = await proof_verify(out, mesh.ca.ca_cert_path)
    assert code == 0, output
    assert "2 of them are proven into a checkpoint cosigned by witness(es) w1" in output

    def rewritten(change: Any) -> Path:
        copy = json.loads(out.read_text())
        change(copy)
        path = tmp_path / f"changed-{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(copy, ensure_ascii=False))
        return path

    position = next(i for i, note in enumerate(document["透明性ログ"]["checkpoints"])
                    if note.split("\n")[1] == str(witnessed_size))
    named = f"proof FAILED: 透明性ログ.checkpoints[{position}]"
    # Without the certificate, the cosignature is by an unknown witness key: refused, never ignored.
    code, output = await proof_verify(rewritten(lambda d: d["透明性ログ"].__setitem__("witness_certificates", [])),
                                      mesh.ca.ca_cert_path)
    assert code == 1 and named in output and "unknown witness" in output, output
    # A certificate of another witness key under the same name does not make a forged line verify.
    other = CertificateAuthority(tmp_path / "other-ca")
    other.create()
    other.issue("witness", "w1")
    code, output = await proof_verify(rewritten(lambda d: d["透明性ログ"].__setitem__(
        "witness_certificates", [other.cosigning_paths("w1")[0].read_text()])), mesh.ca.ca_cert_path)
    assert code == 1 and named in output and "not issued by the mesh CA" in output, output


@pytest.mark.parametrize("argv", [
    ["--format", "pdf"],  # no --out
    ["--card", "1234567890123456"],  # no --pin
    ["--page-size", "0"],
    ["--from", "2024-02-01", "--to", "2024-01-01"],
    ["--out", "/nonexistent-directory/disclosure.txt"],
], ids=["pdf-without-out", "card-without-pin", "page-size-0", "from-after-to", "out-in-no-directory"])
async def test_juki_disclose_refuses_bad_arguments_before_any_call(
    mesh: Mesh, database: Any, tmp_path: Path, argv: list[str]
) -> None:
    """A disclosure is itself a provision (本人開示): a command line that cannot succeed records none."""
    from juki.cli.disclose import cmd_disclose
    from juki.cli.main import build_parser
    from juki.mesh.errors import SettingsError

    me = await seed_resident(database, random.Random(f"disclose-refused-{argv[0]}"))
    args = build_parser().parse_args(["disclose", me, "--data-dir", str(endpoints_for(tmp_path, mesh)), *argv])
    with pytest.raises(SettingsError):
        await cmd_disclose(args)
    reply = await mesh.stub().GetDisclosure(signed(me, mesh.ca))
    assert [p.purpose for p in reply.provisions] == ["DISCLOSURE"]  # this one, and no earlier one
