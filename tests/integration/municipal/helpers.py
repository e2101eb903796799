"""Helpers of the municipal and card tests: operator proofs, error reasons, entries."""

from __future__ import annotations

from typing import Any

import grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2
from juki.mesh.errors import from_grpc_error
from juki.mesh.operator import sign_operator_proof

from tests.conftest import tls_for


def sign(ca: Any, request: Any, method: str, operator: str = "demo-operator", password: str = "") -> Any:
    """Put a fresh operator proof on ``request`` (full method name) and return the request."""
    tls = tls_for(ca, "operator", operator)
    sign_operator_proof(request, method, cert_pem=tls.cert.read_bytes(), key_pem=tls.key.read_bytes(),
                        password=password)
    return request


def reason_of(error: grpc.aio.AioRpcError) -> str:
    reason = from_grpc_error(error).reason_name
    assert reason, f"no ErrorInfo in {error}"
    return reason


def violations_of(error: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for v in from_grpc_error(error).violations]


def date(text: str) -> common_pb2.Date:
    year, month, day = (int(p) for p in text.split("-"))
    return common_pb2.Date(year=year, month=month, day=day, precision=common_pb2.DATE_PRECISION_FULL)


def person(
    family: str = "中野", given: str = "一郎", born: str = "1970-04-01", sex: int = common_pb2.SEX_MALE,
    street: str = "中野四丁目8番1号", household_id: str = "", relationship: str = "",
    kind: int = common_pb2.RESIDENT_KIND_JAPANESE, code: str = "",
) -> municipal_pb2.ResidentEntry:
    return municipal_pb2.ResidentEntry(
        resident_code=code,
        name=common_pb2.PersonName(family_name=family, given_name=given,
                                   family_name_kana="ナカノ", given_name_kana="イチロウ"),
        birth_date=date(born), sex=sex,  # type: ignore[arg-type]
        address=common_pb2.Address(street=street), resident_kind=kind,  # type: ignore[arg-type]
        household_id=household_id, relationship=relationship,
        registered_domicile="東京都中野区中野四丁目8番" if kind == common_pb2.RESIDENT_KIND_JAPANESE else "",
        head_of_family_register=f"{family}　{given}" if kind == common_pb2.RESIDENT_KIND_JAPANESE else "",
        individual_number="123456789018",
    )
