"""Clients of a running local mesh: find it through ``endpoints.json`` and open mTLS channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from juki.mesh import telemetry
from juki.mesh.errors import SettingsError
from juki.mesh.settings import TlsFiles, default_data_dir
from juki.mesh.supervisor import read_endpoints
from juki.mesh.tls import secure_channel


class MeshClient:
    """Opens channels to the services of a local mesh with one of its demo client identities."""

    def __init__(self, data_dir: Path | None = None, identity: str = "agency") -> None:
        self.data_dir = (data_dir or default_data_dir()).expanduser()
        self.endpoints: dict[str, Any] = read_endpoints(self.data_dir)
        clients = self.endpoints["clients"]
        if identity not in clients:
            raise SettingsError(f"unknown client identity {identity!r}; one of {', '.join(sorted(clients))}")
        entry = clients[identity]
        self.identity = entry["spiffe_id"]
        # Before the first channel: its interceptors take the tracer provider set here.
        telemetry.setup_client(self.identity)
        # The demo operator's password (the PIN of its operator card) for the local mesh; empty elsewhere.
        self.password: str = str(entry.get("password", ""))
        self.tls = TlsFiles(ca=Path(self.endpoints["ca"]), cert=Path(entry["cert"]), key=Path(entry["key"]))
        self._channels: dict[str, grpc.aio.Channel] = {}

    def address(self, instance: str) -> str:
        services = self.endpoints["services"]
        if instance not in services:
            raise SettingsError(f"the mesh runs no {instance!r}; it runs {', '.join(sorted(services))}")
        return str(services[instance]["address"])

    def channel(self, instance: str) -> grpc.aio.Channel:
        if instance not in self._channels:
            self._channels[instance] = secure_channel(self.address(instance), self.tls)
        return self._channels[instance]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
