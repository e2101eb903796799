"""The one error catalog of the mesh, read from the contract.

Every failure a caller can see has a stable *reason* (sent as ``google.rpc.ErrorInfo.reason``), a gRPC
status code and a retry tag. They are defined once, as the ``ErrorReason`` enum of
``proto/juki/common/v1/common.proto`` and its ``(error_reason)`` value options; :class:`Reason` is read
from those options when this module is imported, and the import fails if the two disagree. Services
raise :class:`JukiError` (or a helper below); one interceptor turns it into a status with ``google.rpc``
details. A caller's mistake is never ``INTERNAL``.

The other direction is here too: :func:`from_grpc_error` decodes a failed call's status details into a
:class:`RemoteError`, and :func:`passed_on` is the one rule by which a service turns a failure of a
service it called into what its own caller sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from juki._gen.juki.common.v1 import common_pb2

ERROR_DOMAIN = "juki.local"
# The proto enum's value names carry this prefix; ErrorInfo.reason and Reason names do not.
PROTO_PREFIX = "ERROR_REASON_"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class ErrorKind:
    """The contract of one reason, as its ``(juki.common.v1.error_reason)`` option states it."""

    number: int  # the ErrorReason value
    code: grpc.StatusCode
    retryable: bool
    summary: str
    metadata_keys: frozenset[str]
    relayed: bool  # passed on unchanged by a service that called on its caller's behalf


def _read_catalog() -> dict[str, ErrorKind]:
    catalog: dict[str, ErrorKind] = {}
    for value in common_pb2.ErrorReason.DESCRIPTOR.values:
        if value.number == common_pb2.ERROR_REASON_UNSPECIFIED:
            continue
        options = value.GetOptions()
        if not options.HasExtension(common_pb2.error_reason):
            raise ImportError(f"{value.name} in common.proto has no (error_reason) option")
        spec = options.Extensions[common_pb2.error_reason]
        try:
            code = grpc.StatusCode[spec.status_code]
        except KeyError:
            raise ImportError(f"{value.name}: {spec.status_code!r} is not a gRPC status code") from None
        if code is grpc.StatusCode.OK or not spec.summary:
            raise ImportError(f"{value.name}: a reason needs an error status code and a summary")
        catalog[value.name.removeprefix(PROTO_PREFIX)] = ErrorKind(
            value.number, code, spec.retryable, spec.summary, frozenset(spec.metadata_keys), spec.relayed)
    return catalog


# Every reason of the contract, by its name without the prefix.
CATALOG: Mapping[str, ErrorKind] = _read_catalog()


def _kind(name: str) -> ErrorKind:
    try:
        return CATALOG[name]
    except KeyError:
        raise ImportError(f"Reason.{name} is not a value of ErrorReason in common.proto") from None


class Reason(Enum):
    """Stable error reasons; the name is what callers see in ``ErrorInfo.reason``.

    The members are named here so that code can refer to them; everything else comes from the proto,
    and the module checks below that the two lists are the same.
    """

    INVALID_FIELD = _kind("INVALID_FIELD")
    CHECK_DIGIT_MISMATCH = _kind("CHECK_DIGIT_MISMATCH")
    UNKNOWN_MUNICIPALITY = _kind("UNKNOWN_MUNICIPALITY")
    DUPLICATE_NOTIFICATION_CONFLICT = _kind("DUPLICATE_NOTIFICATION_CONFLICT")
    SEQUENCE_GAP = _kind("SEQUENCE_GAP")
    PURPOSE_NOT_GRANTED = _kind("PURPOSE_NOT_GRANTED")
    FIELD_NOT_GRANTED = _kind("FIELD_NOT_GRANTED")
    NOT_A_PUBLIC_BODY = _kind("NOT_A_PUBLIC_BODY")
    PEER_NOT_AUTHORISED = _kind("PEER_NOT_AUTHORISED")
    QUOTA_EXCEEDED = _kind("QUOTA_EXCEEDED")
    OPERATOR_PROOF_INVALID = _kind("OPERATOR_PROOF_INVALID")
    OPERATOR_PROOF_REPLAYED = _kind("OPERATOR_PROOF_REPLAYED")
    RESIDENT_NOT_FOUND = _kind("RESIDENT_NOT_FOUND")
    MUNICIPALITY_DISCONNECTED = _kind("MUNICIPALITY_DISCONNECTED")
    CARD_NOT_FOUND = _kind("CARD_NOT_FOUND")
    CARD_LOCKED = _kind("CARD_LOCKED")
    CARD_SUSPENDED = _kind("CARD_SUSPENDED")
    CARD_REVOKED = _kind("CARD_REVOKED")
    CARD_EXPIRED = _kind("CARD_EXPIRED")
    CARD_ISSUANCE_ENDED = _kind("CARD_ISSUANCE_ENDED")
    PIN_MISMATCH = _kind("PIN_MISMATCH")
    SPECIAL_MOVE_IN_EXPIRED = _kind("SPECIAL_MOVE_IN_EXPIRED")
    NOT_SAME_HOUSEHOLD = _kind("NOT_SAME_HOUSEHOLD")
    ACCESS_LOG_UNAVAILABLE = _kind("ACCESS_LOG_UNAVAILABLE")
    DEPENDENCY_UNAVAILABLE = _kind("DEPENDENCY_UNAVAILABLE")
    INTERNAL_FAULT = _kind("INTERNAL_FAULT")
    MODE_NOT_GRANTED = _kind("MODE_NOT_GRANTED")
    UNAUTHENTICATED = _kind("UNAUTHENTICATED")
    CERTIFICATE_REVOKED = _kind("CERTIFICATE_REVOKED")
    FAILED_PRECONDITION = _kind("FAILED_PRECONDITION")
    DEADLINE_EXCEEDED = _kind("DEADLINE_EXCEEDED")
    DEPENDENCY_REFUSED = _kind("DEPENDENCY_REFUSED")

    @property
    def number(self) -> int:
        """The ``juki.common.v1.ErrorReason`` value of this reason (as in ``ProvisionRecord.refusal_reason``)."""
        return self.value.number


def disagreements(names: Iterable[str], catalog: Mapping[str, ErrorKind]) -> list[str]:
    """How a list of reason names differs from the contract's catalogue (empty when they agree)."""
    listed = set(names)
    return [
        *(f"{name} is in common.proto but not in Reason" for name in sorted(set(catalog) - listed)),
        *(f"{name} is in Reason but not in common.proto" for name in sorted(listed - set(catalog))),
    ]


_DISAGREEMENTS = disagreements(Reason.__members__, CATALOG)
if _DISAGREEMENTS:
    raise ImportError("the error reasons disagree with common.proto: " + "; ".join(_DISAGREEMENTS))


@dataclass(frozen=True)
class FieldViolation:
    """One offending field of a request (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str
    reason: str = "INVALID_FIELD"


class JukiError(Exception):
    """An error a caller can act on; the interceptor maps it to a gRPC status with details."""

    def __init__(
        self,
        reason: Reason,
        message: str | None = None,
        *,
        violations: Sequence[FieldViolation] = (),
        metadata: dict[str, str] | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        self.reason = reason
        self.message = message or reason.value.summary
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})
        self.retry_after_seconds = retry_after_seconds
        super().__init__(f"{reason.name}: {self.message}")

    @property
    def code(self) -> grpc.StatusCode:
        return self.reason.value.code

    @property
    def retryable(self) -> bool:
        return self.reason.value.retryable


class SettingsError(Exception):
    """Bad settings: start-up stops with this message."""


def invalid(field: str, description: str, reason: Reason = Reason.INVALID_FIELD) -> JukiError:
    """One bad field: ``INVALID_ARGUMENT`` naming it."""
    return JukiError(reason, f"{field}: {description}", violations=[FieldViolation(field, description, reason.name)])


def invalid_many(violations: Iterable[FieldViolation]) -> JukiError:
    found = list(violations)
    reasons = {v.reason for v in found}
    reason = Reason[reasons.pop()] if len(reasons) == 1 and reasons <= set(Reason.__members__) else Reason.INVALID_FIELD
    summary = "; ".join(f"{v.field}: {v.description}" for v in found[:5])
    return JukiError(reason, summary, violations=found)


# -- the client side: a failed call's status, decoded once -----------------------------------------

# Statuses that say the call may succeed later when the server sent no catalogued reason (a proxy, a
# server outside the mesh, the client library itself).
_TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
})


class RemoteError(Exception):
    """A failed call as its server described it: the status and its ``google.rpc`` details.

    ``reason`` is the catalogued :class:`Reason` when the server is of this mesh (domain ``juki.local``)
    and named one; ``reason_name`` is whatever ErrorInfo said, catalogued or not.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason_name: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after_seconds: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason_name = reason_name
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)
        self.retry_after_seconds = retry_after_seconds
        super().__init__(f"{code.name}: {message}")

    @property
    def reason(self) -> Reason | None:
        if self.domain == ERROR_DOMAIN and self.reason_name in Reason.__members__:
            return Reason[self.reason_name]
        return None

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later: RetryInfo says so, else the reason, else the code."""
        if self.retry_after_seconds is not None:
            return True
        reason = self.reason
        if reason is not None:
            return reason.value.retryable
        return self.code in _TRANSIENT


def _status_details(trailing: Any) -> status_pb2.Status | None:
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None  # a malformed trailer says nothing; the status code still stands
    return None


def from_grpc_error(error: grpc.RpcError) -> RemoteError:
    """Decode ``grpc-status-details-bin`` of a failed call (``grpc.aio.AioRpcError`` or a blocking
    ``grpc.RpcError``): ErrorInfo, BadRequest and RetryInfo; a detail of another type is skipped."""
    call: Any = error
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = (call.details() if hasattr(call, "details") else None) or ""
    status = _status_details(call.trailing_metadata() if hasattr(call, "trailing_metadata") else None)
    reason_name = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry: float | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason_name, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description, v.reason or Reason.INVALID_FIELD.name)
                              for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            detail.Unpack(info_retry)
            retry = info_retry.retry_delay.seconds + info_retry.retry_delay.nanos / 1e9
    return RemoteError(code, message, reason_name=reason_name, domain=domain, metadata=metadata,
                       violations=violations, retry_after_seconds=retry)


def _as_callers(violation: FieldViolation, caller_fields: Mapping[str, str]) -> FieldViolation | None:
    for theirs, ours in caller_fields.items():
        if violation.field == theirs or violation.field.startswith((f"{theirs}.", f"{theirs}[")):
            return FieldViolation(ours + violation.field[len(theirs):], violation.description, violation.reason)
    return None


def passed_on(remote: RemoteError | grpc.RpcError, dependency: str, *,
              caller_fields: Mapping[str, str] | None = None) -> JukiError:
    """What this service's caller sees when ``dependency``, called on the caller's behalf, failed.

    The one rule of the mesh (the ``relayed`` option of the contract): a relayed reason (a fact about
    the resident or card the caller named) is passed on unchanged; anything else concerns the request
    this service built, not the caller's, so its field violations are not the caller's either. It
    becomes DEPENDENCY_UNAVAILABLE when it may pass (with the dependency's retry delay) and
    DEPENDENCY_REFUSED otherwise, naming the dependency, its status and its reason in the metadata.

    The one exception is declared by the call site: ``caller_fields`` maps fields of the dependency's
    request that hold the caller's fields unchanged (e.g. a page token passed through) to the caller's
    names. When every violation of an INVALID_ARGUMENT is in one of them, the caller's request was bad,
    and the violations are passed on under the caller's names.
    """
    if not isinstance(remote, RemoteError):
        remote = from_grpc_error(remote)
    if remote.code is grpc.StatusCode.INVALID_ARGUMENT and caller_fields and remote.violations:
        renamed = [_as_callers(violation, caller_fields) for violation in remote.violations]
        if all(renamed):
            return invalid_many(violation for violation in renamed if violation is not None)
    reason = remote.reason
    if reason is not None and reason.value.relayed and reason.value.code == remote.code:
        kept = {key: value for key, value in remote.metadata.items() if key in reason.value.metadata_keys}
        return JukiError(reason, f"{dependency}: {remote.message or reason.value.summary}", metadata=kept,
                         retry_after_seconds=remote.retry_after_seconds)
    metadata = {"dependency": dependency, "dependency_status": remote.code.name}
    if remote.reason_name:
        metadata["dependency_reason"] = remote.reason_name
    if remote.retryable:
        return JukiError(Reason.DEPENDENCY_UNAVAILABLE,
                         f"{dependency} failed: {remote.code.name}: {remote.message}".rstrip(": "),
                         metadata=metadata, retry_after_seconds=remote.retry_after_seconds)
    return JukiError(Reason.DEPENDENCY_REFUSED,
                     f"{dependency} refused the request: {remote.code.name}: {remote.message}".rstrip(": "),
                     metadata=metadata)
