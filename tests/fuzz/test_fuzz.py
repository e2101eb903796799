"""Fuzz: generated and malformed requests for every RPC of every service of a running mesh.

For each RPC the caller is an identity the method admits (found by asking), so the request reaches the
handler. Whatever arrives — garbage bytes, a field of the wrong wire type, invalid UTF-8 in a string,
hypothesis-built messages with huge, empty, SQL-like and path-like values (signed with a valid operator
proof half of the time), bad check digits, impossible dates, oversized messages, expired deadlines — the
answer is never INTERNAL or UNKNOWN, an INVALID_ARGUMENT names the offending field, and every service still
answers its health check afterwards.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import symbol_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.card.v1 import card_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.disclosure.v1 import disclosure_pb2
from juki._gen.juki.intake.v1 import intake_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2

from tests.faults import NAKANO, PENSION, Mesh, call_raw, local_mesh, serving

pytestmark = pytest.mark.fuzz

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MODULES = {
    "intake-prefecture-13": intake_pb2, "intake-national": intake_pb2, "lookup": lookup_pb2,
    "accesslog": accesslog_pb2, "disclosure": disclosure_pb2, "card": card_pb2, f"municipal-{NAKANO}": municipal_pb2,
}
CANDIDATES = (("operator", "demo-operator"), ("service", "disclosure"), ("service", "lookup"), ("agency", "jps"),
              ("municipality", NAKANO), ("prefecture", "13"), ("service", "card"), ("witness", "fuzz-witness"))
# Values a hostile or broken client sends in text fields.
NASTY = ["", " ", "'; DROP TABLE residents; --", "' OR '1'='1", "../../../etc/passwd", "..\\..\\windows",
         "%00", "\x00", "𠮷" * 50, "\u202e", "１２３４５６７８９０１", "00000000000", "99999999999",
         "spiffe://juki.local/agency/jps", "{{schema}}", "$1", "\\x00", "NaN", "-1", "12345678901"]
COUNTS: Counter[str] = Counter()
STATUSES: Counter[str] = Counter()


@dataclass(frozen=True)
class Rpc:
    instance: str
    service: str
    method: _descriptor.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def request_class(self) -> type[_message.Message]:
        cls: type[_message.Message] = symbol_database.Default().GetSymbol(self.method.input_type.full_name)
        return cls

    def __str__(self) -> str:
        return f"{self.instance}{self.path}"


def all_rpcs() -> list[Rpc]:
    seen: set[str] = set()
    out = []
    for instance, module in MODULES.items():
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                key = f"{module.__name__}/{service.full_name}/{method.name}"
                # Both intake tiers are fuzzed (their access and checks differ).
                out.append(Rpc(instance, service.full_name, method))
                seen.add(key)
    return out


RPCS = all_rpcs()


@pytest.fixture(scope="module")
async def fuzz_mesh() -> AsyncIterator[Mesh]:
    async with local_mesh(40, prefix="juki-fuzz-") as mesh:
        yield mesh
        print("FUZZ " + json.dumps({"requests": dict(COUNTS), "statuses": dict(STATUSES)}))


_callers: dict[str, tuple[str, str]] = {}


async def caller_for(mesh: Mesh, rpc: Rpc) -> grpc.aio.Channel:
    """A channel as the first identity this method admits (an empty request tells: PEER_NOT_AUTHORISED or not).

    Only an answer that the mesh itself gave counts: OK, or a status carrying the error catalog's reason. A
    bare status with no reason (a transport error, a deadline, a status the client library made up) says
    nothing about admission; the probe is repeated, and an identity that never gets a real answer fails
    the test rather than being taken as admitted.
    """
    if str(rpc) not in _callers:
        admitted = []
        for kind, name in CANDIDATES:
            for _attempt in range(3):
                code, details = await send(mesh.channel(rpc.instance, kind, name), rpc, b"")
                if code is grpc.StatusCode.OK or (details is not None and details.reason):
                    break
            else:
                pytest.fail(f"{kind}/{name} got no answer from the mesh for {rpc}: {code.name} {details}")
            if code is grpc.StatusCode.PERMISSION_DENIED and details is not None \
                    and details.reason == "PEER_NOT_AUTHORISED":
                continue
            admitted.append((code is not grpc.StatusCode.PERMISSION_DENIED, (kind, name)))
        if not admitted:
            pytest.fail(f"no identity may call {rpc}")
        # Prefer an identity the handler itself does not refuse (e.g. a public body for ListPurposes).
        _callers[str(rpc)] = sorted(admitted, key=lambda a: not a[0])[0][1]
    return mesh.channel(rpc.instance, *_callers[str(rpc)])


async def send(channel: grpc.aio.Channel, rpc: Rpc, payload: bytes, timeout: float = 30) -> Any:
    return await call_raw(channel, rpc.path, payload, client_stream=rpc.method.client_streaming,
                          server_stream=rpc.method.server_streaming, timeout=timeout)


def check(rpc: Rpc, kind: str, code: grpc.StatusCode, details: Any) -> None:
    COUNTS[kind] += 1
    STATUSES[code.name] += 1
    assert code not in FORBIDDEN, f"{rpc} answered {code.name} to {kind}: {details}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert details is not None and details.fields, f"{rpc}: INVALID_ARGUMENT without a field for {kind}: {details}"


# -- malformed bytes --------------------------------------------------------------------------------------

def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(cls: type[_message.Message]) -> list[Any]:
    return list(cls.DESCRIPTOR.fields)


def _first_string_field(cls: type[_message.Message]) -> Any:
    for f in _fields(cls):
        if f.type == _descriptor.FieldDescriptor.TYPE_STRING:
            return f
    return None


def _name_path(cls: type[_message.Message]) -> bytes | None:
    """Bytes of a request whose nested PersonName.family_name (or first string) is invalid UTF-8."""
    bad = b"\xff\xfe\xc3\x28\xed\xa0\x80"
    for f in _fields(cls):
        if f.type == _descriptor.FieldDescriptor.TYPE_MESSAGE and f.message_type.full_name == "juki.common.v1.PersonName":
            inner = _key(1, 2) + _varint(len(bad)) + bad
            return _key(f.number, 2) + _varint(len(inner)) + inner
        if f.type == _descriptor.FieldDescriptor.TYPE_MESSAGE and f.message_type.full_name.startswith("juki."):
            nested = symbol_database.Default().GetSymbol(f.message_type.full_name)
            inner_bytes = _name_path(nested) if f.message_type.full_name != cls.DESCRIPTOR.full_name else None
            if inner_bytes:
                return _key(f.number, 2) + _varint(len(inner_bytes)) + inner_bytes
    string_field = _first_string_field(cls)
    if string_field is not None:
        return _key(string_field.number, 2) + _varint(len(bad)) + bad
    return None


def malformed(cls: type[_message.Message]) -> dict[str, bytes]:
    cases = {
        "garbage": b"\xff\xff\xff\xff\x0f\x01\x02",
        "truncated": b"\x0a\x40abc",
        "unknown-field": _key(999, 0) + _varint(5),
        "zero-tag": b"\x00\x01",
        "group-tag": _key(1, 3),
    }
    first = cls.DESCRIPTOR.fields[0] if cls.DESCRIPTOR.fields else None
    if first is not None:
        # The first field with the wrong wire type: a varint where a string/message goes, or the reverse.
        if first.type in (_descriptor.FieldDescriptor.TYPE_STRING, _descriptor.FieldDescriptor.TYPE_MESSAGE,
                          _descriptor.FieldDescriptor.TYPE_BYTES):
            cases["wrong-type"] = _key(first.number, 0) + _varint(2**40)
        else:
            cases["wrong-type"] = _key(first.number, 2) + _varint(3) + b"abc"
    bad_utf8 = _name_path(cls)
    if bad_utf8 is not None:
        cases["invalid-utf8"] = bad_utf8
    return cases


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_malformed_bytes_are_refused_as_invalid(fuzz_mesh: Mesh, rpc: Rpc) -> None:
    channel = await caller_for(fuzz_mesh, rpc)
    for kind, payload in malformed(rpc.request_class).items():
        code, details = await send(channel, rpc, payload)
        check(rpc, kind, code, details)
        if kind in ("garbage", "truncated", "invalid-utf8", "group-tag"):
            assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{rpc} answered {code.name} to {kind}: {details}"


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_oversized_and_expired_requests(fuzz_mesh: Mesh, rpc: Rpc) -> None:
    channel = await caller_for(fuzz_mesh, rpc)
    field = _first_string_field(rpc.request_class)
    number = field.number if field is not None else 1
    huge = b"x" * (17 * 1024 * 1024)
    code, details = await send(channel, rpc, _key(number, 2) + _varint(len(huge)) + huge, timeout=120)
    check(rpc, "oversized", code, details)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, f"{rpc}: {code.name} {details}"
    code, details = await send(channel, rpc, b"", timeout=0.0005)
    check(rpc, "expired-deadline", code, details)  # a fast answer may still beat a 0.5 ms deadline
    assert await serving(channel)


# -- generated messages ----------------------------------------------------------------------------------

def _scalar(f: Any) -> st.SearchStrategy[Any]:
    t = _descriptor.FieldDescriptor
    if f.type == t.TYPE_STRING:
        return st.one_of(st.sampled_from(NASTY), st.text(max_size=40),
                         st.integers(0, 10**12).map(lambda n: str(n).zfill(11)),
                         st.integers(1, 200_000).map(lambda n: "あ" * n))
    if f.type == t.TYPE_BYTES:
        return st.binary(max_size=64)
    if f.type == t.TYPE_BOOL:
        return st.booleans()
    if f.type == t.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-5, 1000))
    if f.type in (t.TYPE_INT32, t.TYPE_SINT32, t.TYPE_SFIXED32):
        return st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-3, 3000))
    if f.type in (t.TYPE_UINT32, t.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if f.type in (t.TYPE_INT64, t.TYPE_SINT64, t.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    if f.type in (t.TYPE_UINT64, t.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    return st.floats(allow_nan=True)


def _repeated(f: Any) -> bool:
    return bool(getattr(f, "is_repeated", False) or getattr(f, "label", 0) == 3)


def messages(cls: type[_message.Message], depth: int = 0) -> st.SearchStrategy[_message.Message]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in _fields(cls):
        if f.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2 or f.message_type.full_name == "juki.common.v1.OperatorProof":
                continue
            nested = symbol_database.Default().GetSymbol(f.message_type.full_name)
            value: st.SearchStrategy[Any] = messages(nested, depth + 1)
        else:
            value = _scalar(f)
        if _repeated(f):
            value = st.lists(value, max_size=3)
        fields[f.name] = st.one_of(st.none(), value)

    @st.composite
    def build(draw: Any) -> _message.Message:
        message = cls()
        for name, strategy in fields.items():
            value = draw(strategy)
            if value is None:
                continue
            f = cls.DESCRIPTOR.fields_by_name[name]
            try:
                if _repeated(f):
                    if f.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
                        getattr(message, name).extend(value)
                    else:
                        getattr(message, name).extend(value)
                elif f.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
                    getattr(message, name).CopyFrom(value)
                else:
                    setattr(message, name, value)
            except (ValueError, TypeError):
                continue  # a value the message type itself refuses (e.g. an enum out of range in proto2)
        return message

    return build()


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_generated_requests_never_fault(fuzz_mesh: Mesh, rpc: Rpc) -> None:
    channel = await caller_for(fuzz_mesh, rpc)
    cls = rpc.request_class
    signable = "operator_proof" in cls.DESCRIPTOR.fields_by_name
    loop = asyncio.get_running_loop()
    calls: list[tuple[bytes, str]] = []

    @settings(max_examples=50, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(message=messages(cls), sign=st.booleans())
    def collect(message: _message.Message, sign: bool) -> None:
        if signable and sign:
            fuzz_mesh.sign(message, rpc.path)
        calls.append((message.SerializeToString(), "generated-signed" if signable and sign else "generated"))

    await loop.run_in_executor(None, collect)
    for payload, kind in calls:
        code, details = await send(channel, rpc, payload, timeout=60)
        check(rpc, kind, code, details)
    assert await serving(channel)


# -- the specific errors ---------------------------------------------------------------------------------

BAD_CODE = "12345678900"  # 11 digits, wrong check digit
IMPOSSIBLE = common_pb2.Date(year=2023, month=2, day=30)


async def test_bad_check_digits_and_impossible_dates_name_their_field(fuzz_mesh: Mesh) -> None:
    mesh = fuzz_mesh
    cases: list[tuple[str, str, str, tuple[str, str], _message.Message, str]] = [
        ("lookup", "juki.lookup.v1.LookupService", "LookupByCode", ("agency", "jps"),
         lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=BAD_CODE), "resident_code"),
        ("lookup", "juki.lookup.v1.LookupService", "SearchByFourItems", ("agency", "jps"),
         lookup_pb2.SearchByFourItemsRequest(purpose=PENSION, name="山田　太郎", birth_date=IMPOSSIBLE,
                                             sex=common_pb2.SEX_MALE, address="東京都中野区中野4-8-1"), "birth_date"),
        ("intake-national", "juki.intake.v1.IntakeService", "GetResident", ("operator", "demo-operator"),
         intake_pb2.GetResidentRequest(resident_code=BAD_CODE), "resident_code"),
        ("accesslog", "juki.accesslog.v1.AccessLogService", "ListProvisions", ("service", "disclosure"),
         accesslog_pb2.ListProvisionsRequest(resident_code=BAD_CODE), "resident_code"),
        ("card", "juki.card.v1.CardService", "GetCardStatus", ("operator", "demo-operator"),
         card_pb2.GetCardStatusRequest(card_number="0000-XXXX"), "card_number"),
        (f"municipal-{NAKANO}", "juki.municipal.v1.MunicipalService", "GetResidentEntry",
         ("operator", "demo-operator"),
         municipal_pb2.GetResidentEntryRequest(resident_code=BAD_CODE, requesting_municipality_code=NAKANO),
         "resident_code"),
    ]
    valid_code = (await _any_code(mesh))
    cases.append(("accesslog", "juki.accesslog.v1.AccessLogService", "ListProvisions", ("service", "disclosure"),
                  accesslog_pb2.ListProvisionsRequest(resident_code=valid_code, from_date=IMPOSSIBLE), "from_date"))
    failures = []
    for instance, service, method, identity, request, field in cases:
        code, details = await call_raw(mesh.channel(instance, *identity), f"/{service}/{method}",
                                       request.SerializeToString())
        COUNTS["specific"] += 1
        if code is not grpc.StatusCode.INVALID_ARGUMENT or details is None or \
                not any(f.split(".")[-1].split("[")[0] == field or f.endswith(field) for f in details.fields):
            failures.append(f"{method} {field}: {code.name} {details}")
    assert not failures, failures


async def _any_code(mesh: Mesh) -> str:
    conn = await mesh.admin()
    try:
        return str(await conn.fetchval("SELECT resident_code FROM intake_national.residents LIMIT 1"))
    finally:
        await conn.close()


async def test_every_service_still_serves(fuzz_mesh: Mesh) -> None:
    for instance in MODULES:
        assert await serving(fuzz_mesh.channel(instance, "operator", "demo-operator")), instance
    for spec in fuzz_mesh.supervisor.specs:
        assert fuzz_mesh.supervisor.restarts.get(spec.instance, 0) == 0, f"{spec.instance} crashed and restarted"
