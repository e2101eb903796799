"""Pagination one way (AIP-158): ``page_size``/``page_token`` in, ``next_page_token`` out, keyset tokens.

A token is opaque to clients: URL-safe base64 of a small JSON list ``[version, kind, scope, position]``.
``position`` is the sort key of the last item returned (a keyset, not an offset), so a page is one indexed
range query however deep it is, and rows added meanwhile neither shift nor repeat items. ``scope`` is a
short digest of what the list is of (the resident, the caller and 事務): a token is refused, naming the
field, when it is used for another list, or when it is not a token this service made. A token grants
nothing: the request is authorised as always, and the position only says where to continue.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from juki.mesh.errors import invalid

TOKEN_VERSION = 1
_MAX_TOKEN_CHARS = 512


def _scope(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


def encode_token(kind: str, scope: str, position: Sequence[int | str]) -> str:
    """A page token continuing after ``position`` in the list ``kind`` of ``scope``."""
    document = [TOKEN_VERSION, kind, _scope(scope), list(position)]
    raw = json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_token(token: str, kind: str, scope: str, field: str = "page_token") -> list[Any]:
    """The position a token of ``kind`` for ``scope`` continues after; INVALID_ARGUMENT naming ``field`` if not."""
    refused = invalid(field, "not a page token returned by this method for this request")
    if len(token) > _MAX_TOKEN_CHARS or not token.isascii():
        raise refused
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        document = json.loads(raw)
    except (binascii.Error, ValueError):
        raise refused from None
    if not (isinstance(document, list) and len(document) == 4 and document[0] == TOKEN_VERSION
            and document[1] == kind and isinstance(document[3], list)):
        raise refused
    if document[2] != _scope(scope):
        raise invalid(field, "this page token belongs to another list (other parameters or caller)")
    return document[3]


def page_size(requested: int, default: int, maximum: int, field: str = "page_size") -> int:
    """AIP-158: 0 means the default, a negative size is refused, a larger one is lowered to the maximum."""
    if requested < 0:
        raise invalid(field, "must not be negative")
    return min(requested or default, maximum)
