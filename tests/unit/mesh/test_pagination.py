"""Page tokens: opaque, bound to their list, refused by field when they are not this service's."""

from __future__ import annotations

import base64

import grpc
import pytest
from juki.mesh.errors import JukiError
from juki.mesh.pagination import decode_token, encode_token, page_size


def test_a_token_round_trips_and_is_opaque() -> None:
    token = encode_token("history", "24727059608", [1_700_000_000_123_456, "2024-05-01", "24727059608", 3])
    assert token.isascii() and "=" not in token and "24727059608" not in token
    assert decode_token(token, "history", "24727059608") == [1_700_000_000_123_456, "2024-05-01", "24727059608", 3]


@pytest.mark.parametrize("token", [
    "garbage!", "12", "é", "x" * 600, base64.urlsafe_b64encode(b"[1]").decode(),
    base64.urlsafe_b64encode(b'[2,"history","0000000000000000",[]]').decode(),
    encode_token("changes", "a", [1]),
])
def test_what_is_not_a_token_of_this_list_is_refused_naming_the_field(token: str) -> None:
    with pytest.raises(JukiError) as refused:
        decode_token(token, "history", "a", field="page_token")
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in refused.value.violations] == ["page_token"]


def test_a_token_of_another_list_of_the_same_kind_is_refused() -> None:
    with pytest.raises(JukiError, match="another list"):
        decode_token(encode_token("history", "24727059608", [1]), "history", "24846016224")


def test_page_sizes() -> None:
    assert (page_size(0, 100, 1000), page_size(7, 100, 1000), page_size(5000, 100, 1000)) == (100, 7, 1000)
    with pytest.raises(JukiError) as refused:
        page_size(-1, 100, 1000, "max_changes")
    assert [v.field for v in refused.value.violations] == ["max_changes"]
