"""Service start-up, written once: grpc.aio server, mTLS, interceptors, health, reflection, shutdown.

A service hands :func:`serve` an object with ``start() -> [ServiceBinding]`` and ``stop()``. Each
binding has its method table (``mesh.methods.Method``: the peer kinds allowed to call, the operator-proof
rule, the name in logs and records): a method not listed is refused (deny by default). The mesh
interceptor takes the peer identity from the verified certificate, checks the CRL and the table,
publishes the call's method (``mesh.methods.current_method``) and maps every exception to one status
with ``google.rpc`` details. Unary and streaming handlers share one wrapper (:class:`_Call`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from juki.mesh import metrics, telemetry
from juki.mesh.db import is_connection_loss
from juki.mesh.errors import ERROR_DOMAIN, JukiError, Reason, invalid, passed_on
from juki.mesh.methods import CallMethod, Method, current_method
from juki.mesh.pki import load_revoked_serials
from juki.mesh.reflection import V1_SERVICE, V1ALPHA_SERVICE, register_v1_descriptor
from juki.mesh.settings import ServiceSettings, TlsFiles
from juki.mesh.tls import Peer, current_peer, peer_from_auth_context, server_credentials, server_options

log = logging.getLogger(__name__)

ANY_PEER: frozenset[str] = frozenset({"*"})


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service of a process and its method table."""

    name: str  # full proto name, e.g. "juki.lookup.v1.LookupService"
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    # method -> its row; a bare set of peer kinds ("*" = any verified peer) is a row without operator proof.
    access: Mapping[str, Method | frozenset[str]]

    def methods(self) -> dict[str, CallMethod]:
        """Full path -> the method of each row (bare names and full paths are both accepted as keys)."""
        found: dict[str, CallMethod] = {}
        for key, row in self.access.items():
            name = key.rsplit("/", 1)[-1]
            spec = row if isinstance(row, Method) else Method(row)
            found[f"/{self.name}/{name}"] = CallMethod(f"/{self.name}/{name}", self.name, name, spec)
        return found

    def path(self, method: str) -> str:
        """The full path of ``method`` (a name in this binding's table)."""
        if method not in self.access:
            raise KeyError(f"{method} is not in the method table of {self.name}")
        return f"/{self.name}/{method}"


class MeshService(Protocol):
    async def start(self) -> Sequence[ServiceBinding]: ...

    async def stop(self) -> None: ...


# -- errors -> status ------------------------------------------------------------------------------

# The delay a caller is told to wait (RetryInfo) before retrying a retryable error, and after an outage of
# the database or another service: short, because the supervisor or Kubernetes restarts it within seconds.
DEFAULT_RETRY_SECONDS = 1.0
# Text PostgreSQL cannot store (a NUL byte, SQLSTATE 22021/22P05) that a handler passed on unchecked.
_UNSTORABLE_TEXT = (asyncpg.exceptions.CharacterNotInRepertoireError, asyncpg.exceptions.UntranslatableCharacterError)
OUTAGE_RETRY_SECONDS = 0.5


def status_for(error: JukiError) -> status_pb2.Status:
    """The ``google.rpc.Status`` of an error: ErrorInfo always, BadRequest and RetryInfo when they apply."""
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(reason=error.reason.name, domain=ERROR_DOMAIN, metadata=error.metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if error.violations:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description, reason=v.reason)
            for v in error.violations
        ])
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    # Every retryable reason says so on the wire (RetryInfo), with the error's own delay or a default one.
    delay = error.retry_after_seconds if error.retry_after_seconds is not None else (
        DEFAULT_RETRY_SECONDS if error.retryable else None)
    if delay is not None:
        seconds = max(delay, 0.0)
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        )
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=details)


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: JukiError) -> None:
    status = status_for(error)
    await context.abort(
        error.code, error.message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )


def _classify(exc: BaseException) -> JukiError:
    """Turn an unexpected exception into a catalogued one (dependency faults are retryable)."""
    if isinstance(exc, JukiError):
        return exc
    if is_connection_loss(exc):
        return JukiError(Reason.DEPENDENCY_UNAVAILABLE, f"a dependency failed: {type(exc).__name__}",
                         retry_after_seconds=OUTAGE_RETRY_SECONDS)
    if isinstance(exc, _UNSTORABLE_TEXT):
        # The caller's input, not a fault of the service.
        return invalid("request", "a text field holds a character that cannot be stored (NUL)")
    if isinstance(exc, grpc.aio.AioRpcError):
        # A call to another service failed and the handler let it through: the mesh's one rule.
        return passed_on(exc, "a service this call needs")
    return JukiError(Reason.INTERNAL_FAULT)


# -- the mesh interceptor ---------------------------------------------------------------------------

class RevocationList:
    """Serials revoked by the CA's CRL, re-read when the file changes (checked every few seconds)."""

    def __init__(self, tls: TlsFiles) -> None:
        self._tls = tls
        self._serials: frozenset[int] = frozenset()
        self._mtime = -1.0
        self._checked = 0.0
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < 2.0:
            return
        self._checked = now
        crl = self._tls.crl
        if crl is None:
            return
        try:
            mtime = crl.stat().st_mtime
        except OSError:
            return
        if mtime != self._mtime:
            self._serials = load_revoked_serials(crl, self._tls.ca)
            self._mtime = mtime

    def is_revoked(self, serial: int) -> bool:
        self._refresh()
        return serial in self._serials


RefusalHook = Callable[[Peer | None, str, JukiError], Awaitable[None]]


class MeshInterceptor(grpc.aio.ServerInterceptor):
    """Identity from the certificate, deny-by-default method access, one error mapping."""

    def __init__(
        self,
        access: Mapping[str, CallMethod],
        revocations: RevocationList,
        on_refusal: RefusalHook | None = None,
    ) -> None:
        self._access = access
        self._revocations = revocations
        self._on_refusal = on_refusal
        self.metrics = metrics.RpcMetrics()
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def _authorise(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Peer:
        peer = peer_from_auth_context(context.auth_context())
        if self._revocations.is_revoked(peer.serial):
            raise JukiError(Reason.CERTIFICATE_REVOKED, f"certificate of {peer.spiffe_id} is revoked")
        row = self._access.get(method)
        allowed = row.spec.callers if row is not None else frozenset()
        if not ("*" in allowed or peer.kind in allowed or peer.spiffe_id in allowed):
            raise JukiError(Reason.PEER_NOT_AUTHORISED, f"{peer.spiffe_id} may not call {method}")
        return peer

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], method: str, exc: BaseException) -> None:
        error = _classify(exc)
        if error.reason is Reason.INTERNAL_FAULT:
            log.error("unexpected failure in %s", method, exc_info=exc)
        elif error.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            log.warning("refused %s: %s", method, error)
            if self._on_refusal is not None:
                peer = current_peer.get()
                if peer is None:  # refused before the peer was set (a revoked certificate): still name it
                    with contextlib.suppress(Exception):
                        peer = peer_from_auth_context(context.auth_context())
                try:
                    await self._on_refusal(peer, method, error)
                except Exception as hook_error:
                    # The caller still gets its refusal; the record of it is what failed, and that is said.
                    log.error("could not record the refusal of %s to %s: %s", method,
                              peer.spiffe_id if peer is not None else "an unknown peer", hook_error,
                              exc_info=hook_error)
        await abort_with(context, error)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # The handler of a method never changes once the server runs: wrap it once, not per call.
        wrapped = self._wrapped[method] = _wrap_handler(handler, method, self)
        return wrapped


class _Undecodable:
    """Stands for a request message that could not be parsed (garbage, wrong wire types, invalid UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _undecodable(item: _Undecodable) -> JukiError:
    return invalid("request", f"the request message cannot be parsed: {item.error}")


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A parse failure becomes INVALID_ARGUMENT (field ``request``) after authorisation, not UNKNOWN/INTERNAL."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, UnicodeDecodeError: whatever the parser raises
            return _Undecodable(exc)

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, _Undecodable):
            raise _undecodable(item)
        yield item


class _Call:
    """One call of any shape: server span, method, peer and access, error mapping, metrics.

    Unary and streaming handlers are wrapped alike: the body runs inside ``async with _Call(...)``;
    authorisation is the body's first step (so that its refusal is mapped and counted like any error).
    """

    __slots__ = ("_context", "_mesh", "_method", "_method_token", "_peer_token", "_span", "_span_token",
                 "_started")

    def __init__(self, mesh: MeshInterceptor, method: CallMethod | None, path: str,
                 attributes: dict[str, str], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._mesh = mesh
        self._context = context
        self._started = time.perf_counter()
        self._span = telemetry.start_server_span(path, context.invocation_metadata(), attributes)
        self._span_token = telemetry.activate(self._span)
        self._method = path
        self._method_token = current_method.set(method)
        self._peer_token: Any = None

    def authorise(self) -> None:
        self._peer_token = current_peer.set(self._mesh._authorise(self._method, self._context))

    async def __aenter__(self) -> _Call:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        code = "OK"
        try:
            if exc is None or isinstance(exc, grpc.aio.AbortError):
                return False
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                # The client went away or its deadline passed: a unary call's task is cancelled; a stream's
                # generator is cancelled in the call's task, or - when grpc was sending rather than iterating
                # at that moment - abandoned and closed later by the loop.
                code = "CANCELLED"
                return False
            if isinstance(exc, Exception):
                code = _classify(exc).code.name
                await self._mesh._fail(self._context, self._method, exc)  # aborts: raises AbortError
            return False
        finally:
            self._finish(code)

    def _finish(self, code: str) -> None:
        """End the span and record the metrics first: they must happen whatever the context resets do."""
        try:
            telemetry.end_server_span(self._span, self._span_token, code)
            self._mesh.metrics.record(self._method, code, (time.perf_counter() - self._started) * 1000)
        finally:
            # An abandoned stream is closed by the event loop in a Context of its own, where these tokens
            # cannot be reset (ValueError); the call's own Context dies with its task anyway.
            if self._peer_token is not None:
                with contextlib.suppress(ValueError):
                    current_peer.reset(self._peer_token)
            with contextlib.suppress(ValueError):
                current_method.reset(self._method_token)


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str, mesh: MeshInterceptor) -> grpc.RpcMethodHandler:
    inner_handler = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    row = mesh._access.get(method)

    def inner(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Undecodable):
            raise _undecodable(request)
        if handler.request_streaming and hasattr(request, "__aiter__"):
            request = _checked(request)
        return inner_handler(request, context)

    service_name, _, method_name = method.lstrip("/").partition("/")
    span_attributes = {"rpc.system": "grpc", "rpc.service": service_name, "rpc.method": method_name}

    async def unary_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with _Call(mesh, row, method, span_attributes, context) as call:
            call.authorise()
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result

    async def stream_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async with _Call(mesh, row, method, span_attributes, context) as call:
            call.authorise()
            result = inner(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                await result

    behavior = stream_behavior if handler.response_streaming else unary_behavior
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=_safe_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


# -- serving ------------------------------------------------------------------------------------------

def _add_reflection(server: grpc.aio.Server, names: Sequence[str]) -> None:
    """Server reflection under both v1alpha (older clients, grpcurl 1.8) and v1 (newer clients).

    One servicer answers both: the two versions have the same wire messages (see ``mesh.reflection``),
    so v1 requests are parsed and answered with the v1alpha classes; the v1 descriptor is registered so
    that the v1 service can be described and resolved like any other.
    """
    register_v1_descriptor()
    service_names = [*names, V1ALPHA_SERVICE, V1_SERVICE, health.SERVICE_NAME]
    servicer = reflection_aio.ReflectionServicer(service_names)
    reflection.enable_server_reflection(service_names, server)
    handler = grpc.method_handlers_generic_handler(V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    })
    server.add_generic_rpc_handlers((handler,))


def _full_access(bindings: Sequence[ServiceBinding]) -> dict[str, CallMethod]:
    table: dict[str, CallMethod] = {}
    for binding in bindings:
        table.update(binding.methods())
    for service, name in (
        (health.SERVICE_NAME, "Check"),
        (health.SERVICE_NAME, "Watch"),
        (V1ALPHA_SERVICE, "ServerReflectionInfo"),
        (V1_SERVICE, "ServerReflectionInfo"),
    ):
        table[f"/{service}/{name}"] = CallMethod(f"/{service}/{name}", service, name, Method(ANY_PEER))
    return table


@dataclass
class RunningServer:
    """A started server: its bound address, health servicer and the means to stop it."""

    server: grpc.aio.Server
    address: str
    health: health.aio.HealthServicer
    names: list[str]
    health_server: grpc.aio.Server | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    interceptor: MeshInterceptor | None = None  # its ``metrics`` are what /metrics reports per RPC

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.stopped.set()


async def start_server(
    settings: ServiceSettings,
    bindings: Sequence[ServiceBinding],
    *,
    on_refusal: RefusalHook | None = None,
) -> RunningServer:
    """Start an mTLS server with the given services, health and reflection; return once listening."""
    mesh = MeshInterceptor(_full_access(bindings), RevocationList(settings.tls), on_refusal)
    # One interceptor does identity, access, errors, metrics and the server span (W3C context from
    # the call's metadata): a second, tracing-only interceptor would add a handler layer to every call.
    # Several processes of one pod share the port only when started to (`juki serve --processes N`); gRPC
    # reads the first value of an option, so the default (0) is replaced, not followed.
    reuse = [("grpc.so_reuseport", 1)] if settings.server.reuse_port else []
    options = server_options(settings.server.max_connection_age_seconds)
    if reuse:
        options = [option for option in options if option[0] != "grpc.so_reuseport"] + reuse
    server = grpc.aio.server(interceptors=[mesh], options=options)
    names = [b.name for b in bindings]
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server, names)
    port = server.add_secure_port(settings.listen, server_credentials(settings.tls))
    # The same file the credentials were just built from: the gauge shows what this server presents.
    metrics.observe_certificate(settings.tls.cert.read_bytes())
    host = settings.listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    await server.start()
    health_server = None
    if settings.health_listen:
        # Kubernetes' native gRPC probes speak plaintext only: this second port serves health and
        # nothing else, so no identity information is reachable without mTLS.
        health_server = grpc.aio.server(options=reuse)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_server.add_insecure_port(settings.health_listen)
        await health_server.start()
    for name in [*names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, address, health_servicer, names, health_server, interceptor=mesh)


def _loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's handler, except for one library artefact of a database outage.

    When PostgreSQL dies in the middle of an operation, asyncpg fails the operation's internal waiter
    (a bare Future of its protocol, not a task of ours) with ConnectionDoesNotExistError; if the caller had
    already given up on that operation, nobody retrieves it and asyncio reports "Future exception was never
    retrieved". The caller saw its own error (UNAVAILABLE) already, so this is logged as a warning naming
    the outage. Everything else, a task of ours above all, goes to asyncio's handler (logged at ERROR; the
    test suites fail on it).
    """
    future = context.get("future")
    error = context.get("exception")
    if (future is not None and not isinstance(future, asyncio.Task)
            and isinstance(error, (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError))
            and is_connection_loss(error)):
        log.warning("a database operation abandoned by its caller ended with the lost connection: %s", error)
        return
    loop.default_exception_handler(context)


async def serve(settings: ServiceSettings, service: MeshService, *, ready_file: Path | None = None) -> None:
    """Run one service until SIGTERM/SIGINT, then drain in-flight calls and stop cleanly."""
    telemetry.setup(settings.instance)
    metrics.setup(settings.instance, settings.metrics_listen)
    asyncio.get_running_loop().set_exception_handler(_loop_exception_handler)
    bindings = await service.start()
    on_refusal = getattr(service, "on_refusal", None)
    running = await start_server(settings, bindings, on_refusal=on_refusal)
    log.info("%s serving on %s (mTLS) with %s", settings.instance, running.address, ", ".join(running.names))
    ready_path = ready_file or settings.ready_file
    if ready_path is not None:
        # Per process: the processes of one pod (serve --processes N) write lookup.ready.0, .1, ... at once.
        tmp = ready_path.with_name(f"{ready_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"address": running.address, "pid": os.getpid(), "instance": settings.instance}))
        tmp.replace(ready_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s shutting down: draining in-flight calls", settings.instance)
    await running.stop(settings.server.shutdown_grace_seconds)
    await service.stop()
    telemetry.shutdown()
    log.info("%s stopped", settings.instance)

