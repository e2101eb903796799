"""The lookup bench's echo (its ceiling) answers with exactly the bytes lookup's own answer would have."""

from __future__ import annotations

from typing import Any

from juki._gen.juki.lookup.v1 import lookup_pb2
from juki.bench.lookup import echo_handlers


class _Server:
    handler: Any = None

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.handler = handlers[0]


class _Details:
    method = "/juki.bench.v1.Echo/VerifyBatch"


async def test_the_echo_verify_answer_equals_serialize_to_string() -> None:
    server = _Server()
    echo_handlers()(server)
    verify = server.handler.service(_Details())
    request = lookup_pb2.VerifyBatchRequest(items=[lookup_pb2.VerifyItem(item_id=i, resident_code="x")
                                                   for i in (1, 127, 128, 300_000)])

    async def requests() -> Any:
        yield request.SerializeToString()

    [answer] = [chunk async for chunk in verify.stream_stream(requests(), None)]
    parsed = lookup_pb2.VerifyBatchResponse.FromString(answer)
    record = parsed.results[0].record
    assert record.resident_code and record.version == 1
    expected = lookup_pb2.VerifyBatchResponse(results=[
        lookup_pb2.VerifyResult(item_id=i, status=lookup_pb2.VERIFY_STATUS_CURRENT, record=record)
        for i in (1, 127, 128, 300_000)])
    assert answer == expected.SerializeToString()
