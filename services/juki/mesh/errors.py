"""The one error catalog of the mesh.

Every failure a caller can see has a stable *reason* (sent as ``google.rpc.ErrorInfo.reason``), a gRPC
status code and a retry tag. Services raise :class:`JukiError` (or a helper below); one interceptor turns
it into a status with ``google.rpc`` details. A caller's mistake is never ``INTERNAL``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import grpc

ERROR_DOMAIN = "juki.local"


@dataclass(frozen=True)
class ErrorKind:
    code: grpc.StatusCode
    retryable: bool
    summary: str


class Reason(Enum):
    """Stable error reasons; the value is what callers see in ``ErrorInfo.reason``."""

    INVALID_FIELD = ErrorKind(grpc.StatusCode.INVALID_ARGUMENT, False, "a field is invalid")
    CHECK_DIGIT_MISMATCH = ErrorKind(grpc.StatusCode.INVALID_ARGUMENT, False, "a check digit does not match")
    UNKNOWN_MUNICIPALITY = ErrorKind(grpc.StatusCode.INVALID_ARGUMENT, False, "no such municipality")
    DUPLICATE_NOTIFICATION_CONFLICT = ErrorKind(
        grpc.StatusCode.ALREADY_EXISTS, False, "a notification with this id but other content exists"
    )
    SEQUENCE_GAP = ErrorKind(grpc.StatusCode.FAILED_PRECONDITION, False, "notifications are missing before this one")
    PURPOSE_NOT_GRANTED = ErrorKind(grpc.StatusCode.PERMISSION_DENIED, False, "this 事務 is not granted to the caller")
    MODE_NOT_GRANTED = ErrorKind(grpc.StatusCode.PERMISSION_DENIED, False, "this query mode is not granted")
    FIELD_NOT_GRANTED = ErrorKind(grpc.StatusCode.PERMISSION_DENIED, False, "a requested field is not granted")
    NOT_A_PUBLIC_BODY = ErrorKind(grpc.StatusCode.PERMISSION_DENIED, False, "only public bodies may query")
    PEER_NOT_AUTHORISED = ErrorKind(grpc.StatusCode.PERMISSION_DENIED, False, "this identity may not call this")
    UNAUTHENTICATED = ErrorKind(grpc.StatusCode.UNAUTHENTICATED, False, "no valid client certificate")
    CERTIFICATE_REVOKED = ErrorKind(grpc.StatusCode.UNAUTHENTICATED, False, "the client certificate is revoked")
    QUOTA_EXCEEDED = ErrorKind(grpc.StatusCode.RESOURCE_EXHAUSTED, True, "the caller's quota is used up")
    OPERATOR_PROOF_INVALID = ErrorKind(grpc.StatusCode.UNAUTHENTICATED, False, "the operator proof is invalid")
    OPERATOR_PROOF_REPLAYED = ErrorKind(grpc.StatusCode.UNAUTHENTICATED, False, "the operator proof was used before")
    RESIDENT_NOT_FOUND = ErrorKind(grpc.StatusCode.NOT_FOUND, False, "no such resident")
    MUNICIPALITY_DISCONNECTED = ErrorKind(
        grpc.StatusCode.FAILED_PRECONDITION, True, "the municipality is disconnected from the network"
    )
    CARD_NOT_FOUND = ErrorKind(grpc.StatusCode.NOT_FOUND, False, "no such card")
    CARD_LOCKED = ErrorKind(grpc.StatusCode.FAILED_PRECONDITION, False, "the card is locked after wrong PINs")
    CARD_SUSPENDED = ErrorKind(grpc.StatusCode.FAILED_PRECONDITION, False, "the card is suspended (一時停止)")
    CARD_REVOKED = ErrorKind(grpc.StatusCode.FAILED_PRECONDITION, False, "the card is revoked")
    CARD_EXPIRED = ErrorKind(grpc.StatusCode.FAILED_PRECONDITION, False, "the card has expired")
    CARD_ISSUANCE_ENDED = ErrorKind(
        grpc.StatusCode.FAILED_PRECONDITION, False, "住基カード issuance and renewal ended on 2015-12-22"
    )
    PIN_MISMATCH = ErrorKind(grpc.StatusCode.PERMISSION_DENIED, False, "the PIN does not match")
    SPECIAL_MOVE_IN_EXPIRED = ErrorKind(
        grpc.StatusCode.FAILED_PRECONDITION, False, "the special move-in must be filed within 14 days"
    )
    NOT_SAME_HOUSEHOLD = ErrorKind(grpc.StatusCode.PERMISSION_DENIED, False, "not a member of the same household")
    FAILED_PRECONDITION = ErrorKind(grpc.StatusCode.FAILED_PRECONDITION, False, "the request does not fit the state")
    ACCESS_LOG_UNAVAILABLE = ErrorKind(
        grpc.StatusCode.UNAVAILABLE, True, "the access log could not record the provision; nothing was provided"
    )
    DEPENDENCY_UNAVAILABLE = ErrorKind(grpc.StatusCode.UNAVAILABLE, True, "a service this call needs is unavailable")
    DEPENDENCY_REFUSED = ErrorKind(
        grpc.StatusCode.FAILED_PRECONDITION, False, "a service this call needs refused the request it was sent"
    )
    DEADLINE_EXCEEDED = ErrorKind(grpc.StatusCode.DEADLINE_EXCEEDED, True, "the deadline passed")
    INTERNAL_FAULT = ErrorKind(grpc.StatusCode.INTERNAL, True, "an internal fault; nothing was changed")


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
