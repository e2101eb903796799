"""The DisclosureService servicer: prove the resident, gather record, history and provisions, log it.

Flow of GetDisclosure:
  1. the resident code must be well formed (INVALID_ARGUMENT otherwise);
  2. proof: the resident's card and PIN, checked by the card service (the card must belong to that
     code), or a counter operator's signed proof (photo ID checked in person);
  3. the disclosure itself is logged in the access log (機能区分 本人開示) and is durable before any
     information is returned, as every provision is;
  4. the current record and its history come from the national intake, the provisions from the
     access log (for this resident's code only: the log is keyed by its pseudonym), the integrity
     report from the access log's verification and its latest signed checkpoint;
  5. each provision carries its Merkle tree leaf and inclusion proof in the tree of a signed checkpoint
     taken after the disclosure's own record was durable, so the resident can check offline (with the
     CA certificate alone) that what is shown is what the log holds (``juki proof verify``).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import grpc

from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.card.v1 import card_pb2, card_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.disclosure.v1 import disclosure_pb2, disclosure_pb2_grpc
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki.domain import is_valid_resident_code
from juki.domain.policy import Policy
from juki.mesh.errors import JukiError, Reason, invalid, passed_on
from juki.mesh.operator import OperatorVerifier
from juki.mesh.settings import spiffe_id
from juki.mesh.tls import require_peer

log = logging.getLogger(__name__)

METHOD = "/juki.disclosure.v1.DisclosureService/GetDisclosure"
SELF = spiffe_id("service", "disclosure")
DISCLOSURE_PURPOSE = "DISCLOSURE"
DISCLOSURE_PURPOSE_NAME = "本人確認情報の開示（本人開示）"
ALL_FIELDS = (common_pb2.FIELD_RESIDENT_CODE, common_pb2.FIELD_NAME, common_pb2.FIELD_BIRTH_DATE,
              common_pb2.FIELD_SEX, common_pb2.FIELD_ADDRESS, common_pb2.FIELD_CHANGE_INFO)
DEFAULT_PAGE_SIZE = 50
# The access log re-verifies itself in the background (every 10 minutes by default); a disclosure takes the
# latest result rather than re-reading a log of many millions of records for each resident.
VERIFY_MAX_AGE_SECONDS = 3600

T = TypeVar("T")
# Fields of the access log's ListProvisionsRequest that hold the caller's own fields unchanged.
PASSED_THROUGH = {"from_date": "from_date", "to_date": "to_date", "page_token": "page_token"}


def checkpoint_tree_size(note: str) -> int:
    """The tree size of a C2SP checkpoint note (its second line). The signature is the resident's to
    check offline; the disclosure service needs the size only to ask for proofs into that tree."""
    lines = note.split("\n")
    if len(lines) < 3 or not lines[1].isascii() or not lines[1].isdigit():
        raise JukiError(Reason.DEPENDENCY_UNAVAILABLE, "the access log sent a malformed checkpoint",
                        retry_after_seconds=1)
    return int(lines[1])


def purpose_name(record: accesslog_pb2.ProvisionRecord, policy: Policy) -> str:
    if record.purpose_name:
        return record.purpose_name
    agency = policy.agency(record.recipient)
    purpose = agency.purposes.get(record.purpose) if agency is not None else None
    return purpose.name if purpose is not None else record.purpose


def shown_provision(record: accesslog_pb2.ProvisionRecord, sequence: int, policy: Policy) -> disclosure_pb2.Provision:
    """A logged record as shown to the resident. Pure: ``juki proof verify`` applies it to the proven leaf
    to check each shown field against the record the log holds."""
    return disclosure_pb2.Provision(
        provided_at=record.provided_at, query_mode=record.query_mode,
        reason=record.reason or purpose_name(record, policy), purpose=record.purpose,
        purpose_name=purpose_name(record, policy), provider=record.provider,
        provider_tier=record.provider_tier, recipient=record.recipient,
        recipient_name=record.recipient_name, fields=record.fields, sequence=sequence,
        resident_code=record.resident_code,
    )


async def call(service: str, awaitable: Awaitable[T], caller_fields: Mapping[str, str] | None = None) -> T:
    """Await a peer's answer; its failure as this service's caller sees it (see mesh.errors.passed_on)."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise passed_on(exc, service, caller_fields=caller_fields) from exc


def check_date_filter(value: common_pb2.Date, field: str) -> dt.date | None:
    """A from/to date of the request: unset, or a calendar date (checked before anything is provided)."""
    if not (value.year or value.month or value.day):
        return None
    try:
        return dt.date(value.year, value.month, value.day)
    except ValueError as exc:
        raise invalid(field, f"not a calendar date: {exc}") from None


class DisclosureServicer(disclosure_pb2_grpc.DisclosureServiceServicer):
    def __init__(
        self,
        *,
        intake: intake_pb2_grpc.IntakeServiceStub,
        accesslog: accesslog_pb2_grpc.AccessLogServiceStub,
        card: card_pb2_grpc.CardServiceStub | None,
        operators: OperatorVerifier,
        policy: Policy,
        timeout: float = 30.0,
    ) -> None:
        self._intake = intake
        self._accesslog = accesslog
        self._card = card
        self._operators = operators
        self._policy = policy
        self._timeout = timeout

    async def _prove(self, request: disclosure_pb2.GetDisclosureRequest) -> str:
        """Check the proof; return the operator id for a counter disclosure, "" for a card."""
        which = request.WhichOneof("proof")
        if which == "card_proof":
            proof = request.card_proof
            if not proof.card_number:
                raise invalid("card_proof.card_number", "the card number is required")
            if not (len(proof.pin) == 4 and proof.pin.isascii() and proof.pin.isdigit()):
                raise invalid("card_proof.pin", "the PIN has 4 digits")
            if self._card is None:
                raise JukiError(Reason.DEPENDENCY_UNAVAILABLE, "the card service is not configured")
            status = await call("card", self._card.GetCardStatus(
                card_pb2.GetCardStatusRequest(card_number=proof.card_number), timeout=self._timeout))
            if status.card.resident_code != request.resident_code:
                raise JukiError(Reason.PEER_NOT_AUTHORISED, "the card does not belong to this resident code")
            checked = await call("card", self._card.VerifyPin(
                card_pb2.VerifyPinRequest(card_number=proof.card_number, pin=proof.pin), timeout=self._timeout))
            if not checked.ok:
                raise JukiError(Reason.PIN_MISMATCH,
                                f"the PIN does not match; {checked.remaining_attempts} attempt(s) left",
                                metadata={"remaining_attempts": str(checked.remaining_attempts)})
            return ""
        if which == "counter_operator":
            verified = await self._operators.check(request)  # the table's rule: counter_operator, when chosen
            assert verified is not None
            return verified.operator_id
        raise invalid("proof", "prove the resident's identity: card_proof or counter_operator")

    async def _log(self, request: disclosure_pb2.GetDisclosureRequest, recipient: str, operator_id: str) -> None:
        record = accesslog_pb2.ProvisionRecord(
            recipient=recipient, recipient_name="本人（開示請求）", purpose=DISCLOSURE_PURPOSE,
            purpose_name=DISCLOSURE_PURPOSE_NAME, query_mode=common_pb2.QUERY_MODE_DISCLOSURE,
            provider_tier=common_pb2.TIER_NATIONAL, provider=SELF, fields=ALL_FIELDS,
            resident_code=request.resident_code, outcome=accesslog_pb2.PROVISION_OUTCOME_PROVIDED,
            operator_id=operator_id, reason="本人からの開示請求" + ("（窓口）" if operator_id else "（住基カード）"),
        )
        record.provided_at.GetCurrentTime()
        try:
            await self._accesslog.Append(accesslog_pb2.AppendRequest(batch_id=str(uuid.uuid4()), records=[record]),
                                         timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise JukiError(Reason.ACCESS_LOG_UNAVAILABLE, retry_after_seconds=1) from exc

    async def _log_refusal(
        self, request: disclosure_pb2.GetDisclosureRequest, recipient: str, error: JukiError
    ) -> None:
        """A failed proof is a security event of that resident's record: logged, shown on request."""
        reason_name = f"ERROR_REASON_{error.reason.name}"
        record = accesslog_pb2.ProvisionRecord(
            recipient=recipient, recipient_name="本人（開示請求）", purpose=DISCLOSURE_PURPOSE,
            purpose_name=DISCLOSURE_PURPOSE_NAME, query_mode=common_pb2.QUERY_MODE_DISCLOSURE,
            provider_tier=common_pb2.TIER_NATIONAL, provider=SELF, resident_code=request.resident_code,
            outcome=accesslog_pb2.PROVISION_OUTCOME_REFUSED,
            refusal_reason=common_pb2.ErrorReason.Value(reason_name)
            if reason_name in common_pb2.ErrorReason.keys() else common_pb2.ERROR_REASON_UNSPECIFIED,
            operator_id=request.counter_operator.operator_id if request.HasField("counter_operator") else "",
            reason="本人確認に失敗した開示請求",
        )
        record.provided_at.GetCurrentTime()
        try:
            await self._accesslog.Append(accesslog_pb2.AppendRequest(batch_id=str(uuid.uuid4()), records=[record]),
                                         timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:  # the refusal stands whether or not it could be logged
            log.warning("could not log a refused disclosure: %s", exc.code().name)

    async def GetDisclosure(
        self, request: disclosure_pb2.GetDisclosureRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> disclosure_pb2.GetDisclosureResponse:
        if not is_valid_resident_code(request.resident_code):
            raise invalid("resident_code", "not a valid 住民票コード (11 digits with check digit)")
        if request.page_size < 0:
            raise invalid("page_size", "must not be negative")
        since = check_date_filter(request.from_date, "from_date")
        until = check_date_filter(request.to_date, "to_date")
        if since is not None and until is not None and until < since:
            raise invalid("to_date", "must not be before from_date")
        peer = require_peer()
        try:
            operator_id = await self._prove(request)
        except JukiError as error:
            if error.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.FAILED_PRECONDITION):
                await self._log_refusal(request, peer.spiffe_id, error)
            raise
        # Validate the filters before anything is provided (the access log would refuse them later).
        list_request = accesslog_pb2.ListProvisionsRequest(
            resident_code=request.resident_code, from_date=request.from_date, to_date=request.to_date,
            page_size=request.page_size or DEFAULT_PAGE_SIZE, page_token=request.page_token,
        )
        resident = await call("national intake", self._intake.GetResident(
            intake_pb2.GetResidentRequest(resident_code=request.resident_code), timeout=self._timeout))
        await self._log(request, peer.spiffe_id, operator_id)

        response = disclosure_pb2.GetDisclosureResponse(identity=resident.record)
        token = ""
        while True:
            page = await call("national intake", self._intake.ListResidentHistory(
                intake_pb2.ListResidentHistoryRequest(resident_code=request.resident_code, page_size=500,
                                                      page_token=token), timeout=self._timeout))
            for version in page.versions:
                response.history.append(disclosure_pb2.HistoryEntry(
                    version=version.version, change_kind=version.change_kind, occurred_on=version.occurred_on,
                    notified_on=version.notified_on, recorded_at=version.recorded_at, record=version.record,
                ))
            token = page.next_page_token
            if not token:
                break

        # Provisions made under the resident's earlier codes (住民票コード変更) are theirs too; the codes
        # come from the national store's own history of this resident, never from the request.
        earlier = {entry.record.resident_code for entry in response.history} | set(resident.followed_codes)
        earlier |= {resident.record.resident_code}
        earlier.discard(request.resident_code)
        earlier.discard("")
        list_request.other_resident_codes.extend(sorted(earlier)[:16])
        # The checkpoint is taken after the disclosure's own record was made durable, and the listing is
        # cut at its tree size, so every provision shown comes with a proof into that signed tree.
        tree = await call("access log", self._accesslog.GetCheckpoint(
            accesslog_pb2.GetCheckpointRequest(), timeout=self._timeout))
        list_request.proof_tree_size = checkpoint_tree_size(tree.tree_checkpoint)
        # A checkpoint a witness cosigned is preferred: every provision it holds is proven into it (a
        # split view would have to fool the witness too); newer ones into the latest checkpoint.
        witnessed_size = checkpoint_tree_size(tree.witnessed_checkpoint) if tree.witnessed_checkpoint else 0
        if 0 < witnessed_size <= list_request.proof_tree_size:
            list_request.witnessed_tree_size = witnessed_size
        listed = await call("access log", self._accesslog.ListProvisions(list_request, timeout=self._timeout),
                            caller_fields=PASSED_THROUGH)
        for logged in listed.provisions:
            shown = shown_provision(logged.record, logged.sequence, self._policy)
            shown.leaf = logged.leaf
            shown.inclusion_proof.extend(logged.inclusion_proof)
            shown.proof_tree_size = logged.proof_tree_size or list_request.proof_tree_size
            response.provisions.append(shown)
        response.next_page_token = listed.next_page_token

        verified = await call("access log", self._accesslog.VerifyLog(
            accesslog_pb2.VerifyLogRequest(max_age_seconds=VERIFY_MAX_AGE_SECONDS), timeout=600))
        checkpoint = verified.latest_checkpoint
        if not checkpoint.sequence:
            checkpoint = (await call("access log", self._accesslog.GetCheckpoint(
                accesslog_pb2.GetCheckpointRequest(), timeout=self._timeout))).checkpoint
        response.integrity.chain_verified = verified.ok
        response.integrity.checkpoint_sequence = checkpoint.sequence
        response.integrity.checkpoint_signed_at.CopyFrom(checkpoint.signed_at)
        response.integrity.verified_at.CopyFrom(verified.verified_at)
        response.integrity.records_checked = verified.records_checked
        response.integrity.checkpoints_checked = verified.checkpoints_checked
        response.integrity.problem = verified.problem
        response.integrity.signing_key_id = checkpoint.key_id
        response.integrity.verified_through_sequence = verified.through_sequence
        response.integrity.tree_checkpoint = tree.tree_checkpoint
        response.integrity.signing_certificate = tree.signing_certificate
        if list_request.witnessed_tree_size:
            response.integrity.witnessed_checkpoint = tree.witnessed_checkpoint
            response.integrity.witness_certificates.extend(tree.witness_certificates)
        if verified.HasField("full_verified_at"):
            response.integrity.full_verified_at.CopyFrom(verified.full_verified_at)
        newest = max((p.sequence for p in response.provisions), default=0)
        if verified.ok and newest > verified.through_sequence:
            # Never state that a listed provision was verified when the verification did not reach it.
            response.integrity.chain_verified = False
            response.integrity.problem = (
                f"the verification reached record {verified.through_sequence}; record {newest} is newer"
            )
        return response
