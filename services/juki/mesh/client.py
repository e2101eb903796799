"""Clients of a running local mesh: find it through ``endpoints.json`` and open mTLS channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from juki.mesh import pki, telemetry
from juki.mesh.errors import SettingsError
from juki.mesh.settings import SPIFFE_TRUST_DOMAIN, TlsFiles, default_data_dir
from juki.mesh.supervisor import read_endpoints
from juki.mesh.tls import secure_channel


def client_entry(endpoints: dict[str, Any], identity: str) -> dict[str, Any]:
    """The certificate and key of a client identity: a demo client named in ``endpoints.json``, or any
    identity the mesh's CA has issued, as ``KIND/NAME`` or ``spiffe://juki.local/KIND/NAME``
    (``juki pki issue agency mofa`` makes ``agency/mofa``)."""
    clients: dict[str, dict[str, Any]] = endpoints["clients"]
    if identity in clients:
        return clients[identity]
    path = identity.removeprefix(f"spiffe://{SPIFFE_TRUST_DOMAIN}/")
    kind, _, name = path.partition("/")
    if kind in pki.KINDS and name and "/" not in name:
        cert, key = pki.CertificateAuthority(Path(endpoints["ca"]).parent).paths(kind, name)
        if cert.is_file() and key.is_file():
            return {"spiffe_id": pki.spiffe_id(kind, name), "cert": str(cert), "key": str(key)}
        raise SettingsError(f"the CA has issued no {kind}/{name} (issue it with `juki pki issue {kind} {name}`)")
    raise SettingsError(f"unknown client identity {identity!r}; one of {', '.join(sorted(clients))},"
                        " or KIND/NAME of any certificate the CA has issued")


class MeshClient:
    """Opens channels to the services of a local mesh as one of its demo clients or any issued identity."""

    def __init__(self, data_dir: Path | None = None, identity: str = "agency") -> None:
        self.data_dir = (data_dir or default_data_dir()).expanduser()
        self.endpoints: dict[str, Any] = read_endpoints(self.data_dir)
        entry = client_entry(self.endpoints, identity)
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
