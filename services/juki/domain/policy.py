"""Who may receive what: the authorisation table modelled on 住基法 別表 (第一〜第六).

A provision of 本人確認情報 is lawful only for a 事務 (purpose) that the table lists for that recipient,
through the query modes and with the fields that row allows; everything else is refused (deny by
default). The table is packaged data (``policy_data.json``) so it can be reviewed as a whole.

Recipients are identified by the SPIFFE id of their verified client certificate. An entry may end in
``*`` to cover a family of identities (every municipality); an exact entry wins over a prefix, and a
longer prefix over a shorter one.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = [
    "Agency",
    "FieldNotGranted",
    "Grant",
    "IdentityField",
    "ModeNotGranted",
    "NotAPublicBody",
    "Policy",
    "PolicyError",
    "Purpose",
    "PurposeNotGranted",
    "QueryMode",
    "UnknownRecipient",
    "default_policy",
]


class QueryMode(enum.Enum):
    """機能区分: how a recipient asks."""

    BY_CODE = "BY_CODE"
    """One resident by 住民票コード."""
    BY_FOUR_ITEMS = "BY_FOUR_ITEMS"
    """One resident by the four items (name, birth date, sex, address)."""
    BATCH_VERIFY = "BATCH_VERIFY"
    """A stream of records checked in bulk (the pension service's monthly run)."""
    CHANGE_FEED = "CHANGE_FEED"
    """Changes since a position, for the recipient's own register."""


class IdentityField(enum.Enum):
    """What a provision may contain."""

    RESIDENT_CODE = "RESIDENT_CODE"
    NAME = "NAME"
    BIRTH_DATE = "BIRTH_DATE"
    SEX = "SEX"
    ADDRESS = "ADDRESS"
    CHANGE_INFO = "CHANGE_INFO"
    """異動事由, 異動年月日 and the notification date."""


class PolicyError(Exception):
    """A refusal by the 別表 table; ``reason`` is the stable name for the error catalog."""

    reason = "POLICY_DENIED"

    def __init__(self, message: str, *, agency_id: str, purpose_code: str | None = None) -> None:
        super().__init__(message)
        self.agency_id = agency_id
        self.purpose_code = purpose_code


class NotAPublicBody(PolicyError):
    """The caller is not a public body in the table (private sector, or unknown): never served."""

    reason = "NOT_A_PUBLIC_BODY"


class UnknownRecipient(NotAPublicBody):
    """The caller's identity is not in the table at all."""

    reason = "UNKNOWN_RECIPIENT"


class PurposeNotGranted(PolicyError):
    """The table lists no such 事務 for this recipient."""

    reason = "PURPOSE_NOT_GRANTED"


class ModeNotGranted(PolicyError):
    """The 事務 is granted, but not through this query mode."""

    reason = "MODE_NOT_GRANTED"


class FieldNotGranted(PolicyError):
    """A requested field is outside what the 事務 allows."""

    reason = "FIELD_NOT_GRANTED"

    def __init__(
        self, message: str, *, agency_id: str, purpose_code: str | None, fields: frozenset[IdentityField]
    ) -> None:
        super().__init__(message, agency_id=agency_id, purpose_code=purpose_code)
        self.fields = fields


@dataclass(frozen=True, slots=True)
class Purpose:
    """One row of the table: a 事務 for one recipient."""

    code: str
    name: str
    schedule_row: str
    modes: frozenset[QueryMode]
    fields: frozenset[IdentityField]


@dataclass(frozen=True, slots=True)
class Agency:
    """A recipient (提供先) and its rows; ``quota_per_second`` bounds its request rate."""

    identity: str
    name: str
    public_body: bool
    quota_per_second: int
    purposes: Mapping[str, Purpose]

    @property
    def is_pattern(self) -> bool:
        """True for an entry covering every identity with its prefix (``.../municipality/*``)."""
        return self.identity.endswith("*")


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission for one recipient to query for one 事務 in one mode; says which fields it may see."""

    agency_id: str
    agency: Agency
    purpose: Purpose
    mode: QueryMode

    @property
    def fields(self) -> frozenset[IdentityField]:
        """The fields this grant allows."""
        return self.purpose.fields

    def filter_fields(self, requested: Iterable[IdentityField] | None = None) -> frozenset[IdentityField]:
        """The requested fields that are allowed, silently dropping the rest (all allowed if ``None``)."""
        if requested is None:
            return self.purpose.fields
        return frozenset(requested) & self.purpose.fields

    def require_fields(self, requested: Iterable[IdentityField]) -> frozenset[IdentityField]:
        """The requested fields, or :class:`FieldNotGranted` naming those outside the grant."""
        wanted = frozenset(requested)
        refused = wanted - self.purpose.fields
        if refused:
            names = ", ".join(sorted(field.value for field in refused))
            raise FieldNotGranted(
                f"{self.agency.name} may not receive {names} for {self.purpose.code}",
                agency_id=self.agency_id,
                purpose_code=self.purpose.code,
                fields=refused,
            )
        return wanted


def _purpose(raw: Mapping[str, Any]) -> Purpose:
    return Purpose(
        code=str(raw["code"]),
        name=str(raw["name"]),
        schedule_row=str(raw["schedule_row"]),
        modes=frozenset(QueryMode(mode) for mode in raw["modes"]),
        fields=frozenset(IdentityField(field) for field in raw["fields"]),
    )


def _agency(raw: Mapping[str, Any]) -> Agency:
    public_body = bool(raw["public_body"])
    purposes = {purpose.code: purpose for purpose in map(_purpose, raw.get("purposes", ()))}
    if not public_body and purposes:
        # Enforced at load time, not trusted to the table's author: the private sector gets nothing.
        raise ValueError(f"{raw['identity']}: a body that is not public cannot be granted a 事務")
    quota = int(raw["quota_per_second"])
    if quota < 0:
        raise ValueError(f"{raw['identity']}: negative quota")
    return Agency(str(raw["identity"]), str(raw["name"]), public_body, quota, purposes)


class Policy:
    """The loaded table; immutable and safe to share between threads."""

    def __init__(self, agencies: Sequence[Agency]) -> None:
        self._exact: dict[str, Agency] = {}
        prefixes: list[tuple[str, Agency]] = []
        for agency in agencies:
            if agency.is_pattern:
                prefixes.append((agency.identity[:-1], agency))
            elif agency.identity in self._exact:
                raise ValueError(f"duplicate recipient {agency.identity}")
            else:
                self._exact[agency.identity] = agency
        self._prefixes = sorted(prefixes, key=lambda item: len(item[0]), reverse=True)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Policy:
        """Build from the JSON shape of ``policy_data.json``."""
        return cls([_agency(raw) for raw in document["agencies"]])

    @classmethod
    def load(cls) -> Policy:
        """The packaged table (``juki/domain/policy_data.json``)."""
        text = resources.files(__package__).joinpath("policy_data.json").read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    @property
    def agencies(self) -> tuple[Agency, ...]:
        """Every entry, exact ones first."""
        return (*self._exact.values(), *(agency for _, agency in self._prefixes))

    def agency(self, agency_id: str) -> Agency | None:
        """The entry governing ``agency_id``: exact match, else the longest matching prefix."""
        exact = self._exact.get(agency_id)
        if exact is not None:
            return exact
        for prefix, agency in self._prefixes:
            if agency_id.startswith(prefix) and len(agency_id) > len(prefix):
                return agency
        return None

    def quota_per_second(self, agency_id: str) -> int:
        """The request-rate quota of ``agency_id`` (0 for anyone not in the table)."""
        agency = self.agency(agency_id)
        return 0 if agency is None else agency.quota_per_second

    def authorise(self, agency_id: str, purpose_code: str, mode: QueryMode) -> Grant:
        """Check that ``agency_id`` may query for ``purpose_code`` in ``mode``; return the grant.

        Raises :class:`UnknownRecipient` / :class:`NotAPublicBody`, :class:`PurposeNotGranted` or
        :class:`ModeNotGranted`, checked in that order.
        """
        agency = self.agency(agency_id)
        if agency is None:
            raise UnknownRecipient(f"{agency_id} is not a recipient in the 別表 table", agency_id=agency_id)
        if not agency.public_body:
            raise NotAPublicBody(f"{agency.name} is not a public body", agency_id=agency_id)
        purpose = agency.purposes.get(purpose_code)
        if purpose is None:
            raise PurposeNotGranted(
                f"{agency.name} has no 事務 {purpose_code!r} in the 別表 table",
                agency_id=agency_id,
                purpose_code=purpose_code,
            )
        if mode not in purpose.modes:
            raise ModeNotGranted(
                f"{purpose.code} does not allow {mode.value}", agency_id=agency_id, purpose_code=purpose_code
            )
        return Grant(agency_id, agency, purpose, mode)


@functools.cache
def default_policy() -> Policy:
    """The packaged table, loaded once per process."""
    return Policy.load()
