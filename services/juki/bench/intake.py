"""``juki bench intake``: end-to-end notification throughput, municipal CS -> prefecture -> national.

Each run builds a throwaway environment in a temporary directory: an embedded PostgreSQL with the
national and prefecture-13 intake schemas, a CA, and the two real intake services as child processes
(``python -m juki serve intake ...``, as ``juki up`` starts them). The client, in this process, acts
as 中野区's CS: it streams 出生 notifications over mTLS through StreamNotifications in large batches,
several batches in flight, and measures per-batch acknowledgement latency (durable at the prefecture).
A run ends when the prefecture's outbox is empty, i.e. every notification is durable at the national
centre; throughput is notifications / that time. Relay lag is the enqueue -> national-ack time the
prefecture records per relayed batch. Figures are medians over the runs.

:class:`IntakeEnvironment` is also used by the chaos tests (kill and restart a tier).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki.bench.harness import Harness, emit, json_flag, percentile, serve_echo
from juki.domain.codes import resident_code_from_body

NAKANO = "131148"


def register_bench(bench_sub: Any) -> None:
    parser = bench_sub.add_parser("intake", help="end-to-end notification throughput (CS -> prefecture -> national)")
    json_flag(parser)
    parser.add_argument("--notifications", type=int, default=60_000, help="notifications per run")
    parser.add_argument("--batch", type=int, default=2_000, help="notifications per stream batch")
    parser.add_argument("--in-flight", type=int, default=4, help="batches sent ahead of their acknowledgement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--profile", type=Path, help="record py-spy profiles of the services into this folder")
    parser.set_defaults(func=cmd_bench_intake)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class IntakeEnvironment(Harness):
    """The harness with the national + prefecture-13 intake processes (and, on demand, the echo server).

    Each service listens on a fixed port chosen at start, so a killed service restarts (``spawn(name)``)
    where its clients (and the prefecture's relay) expect it.
    """

    def __init__(self, keep: bool = False, profile: Path | None = None) -> None:
        super().__init__("intake", keep=keep, profile=profile)
        self.ports = {"intake-national": _free_port(), "intake-prefecture-13": _free_port(), "echo": _free_port()}

    @property
    def national(self) -> str:
        return f"127.0.0.1:{self.ports['intake-national']}"

    @property
    def prefecture(self) -> str:
        return f"127.0.0.1:{self.ports['intake-prefecture-13']}"

    @property
    def echo(self) -> str:
        return f"127.0.0.1:{self.ports['echo']}"

    async def start(self) -> None:
        await self.prepare([("intake", "intake-national"), ("intake", "intake-prefecture-13")])
        self.spawn_service("intake-national", ["intake", "--tier", "national"], self._env("intake-national"))
        self.spawn_service("intake-prefecture-13", ["intake", "--tier", "prefecture", "--prefecture", "13"],
                           self._env("intake-prefecture-13"))

    def start_echo(self) -> None:
        """The ceiling: a bare mTLS grpc.aio server that acknowledges every batch without any work."""
        self.spawn_echo("echo", "juki.bench.intake", self._env("echo"))

    def _env(self, name: str) -> dict[str, str]:
        prefecture = name == "intake-prefecture-13"
        return self.server_env(
            name, ("prefecture", "13") if prefecture else ("service", "intake-national"),
            listen=f"127.0.0.1:{self.ports[name]}",
            JUKI_DATABASE_URL=self.pg.url("juki_" + ("intake_p13" if prefecture else "intake_national")),
            JUKI_NATIONAL_INTAKE_ADDRESS=self.national,
        )


def births(first_sequence: int, count: int, code_offset: int) -> list[intake_pb2.Notification]:
    """``count`` valid 出生 notifications of 中野区 from ``first_sequence`` on, each with a new code."""
    template = intake_pb2.Notification(
        municipality_code=NAKANO,
        change_kind=common_pb2.CHANGE_KIND_BIRTH,
        resident_kind=common_pb2.RESIDENT_KIND_JAPANESE,
        name=common_pb2.PersonName(family_name="中野", given_name="一郎", family_name_kana="ナカノ",
                                   given_name_kana="イチロウ"),
        birth_date=common_pb2.Date(year=2021, month=6, day=1, precision=common_pb2.DATE_PRECISION_FULL),
        sex=common_pb2.SEX_MALE,
        address=common_pb2.Address(municipality_code=NAKANO, prefecture="東京都", municipality="中野区",
                                   street="中野四丁目8番1号"),
        occurred_on=common_pb2.Date(year=2021, month=6, day=1, precision=common_pb2.DATE_PRECISION_FULL),
        notified_on=common_pb2.Date(year=2021, month=6, day=3, precision=common_pb2.DATE_PRECISION_FULL),
    )
    run = uuid.uuid4().hex[:12]
    out = []
    for index in range(count):
        message = intake_pb2.Notification()
        message.CopyFrom(template)
        message.notification_id = f"{run}-{index}"
        message.sequence = first_sequence + index
        message.resident_code = resident_code_from_body(1_000_000_000 + code_offset + index)
        out.append(message)
    return out


async def stream_batches(
    stub: intake_pb2_grpc.IntakeServiceStub, messages: list[intake_pb2.Notification], batch: int, in_flight: int,
) -> tuple[list[float], list[intake_pb2.StreamNotificationsResponse]]:
    """Send ``messages`` in batches, ``in_flight`` ahead; return per-batch ack latencies (ms) and answers."""
    call = stub.StreamNotifications()
    sent: dict[int, float] = {}
    latencies: list[float] = []
    answers: list[intake_pb2.StreamNotificationsResponse] = []
    chunks = [messages[i : i + batch] for i in range(0, len(messages), batch)]
    window = asyncio.Semaphore(in_flight)

    async def writer() -> None:
        for number, chunk in enumerate(chunks, start=1):
            await window.acquire()
            sent[number] = time.perf_counter()
            await call.write(intake_pb2.StreamNotificationsRequest(batch_id=number, notifications=chunk))
        await call.done_writing()

    task = asyncio.create_task(writer())
    try:
        for _ in chunks:
            response = await call.read()
            if response is None or not hasattr(response, "batch_id"):
                raise RuntimeError("the stream ended early")
            latencies.append((time.perf_counter() - sent[response.batch_id]) * 1000)
            answers.append(response)
            window.release()
        await task
    finally:
        task.cancel()
    return latencies, answers


async def wait_relayed(operator: intake_pb2_grpc.IntakeServiceStub, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = await operator.GetIntakeStatus(intake_pb2.GetIntakeStatusRequest())
        if status.outbox_backlog == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"outbox still holds {status.outbox_backlog} notifications")
        await asyncio.sleep(0.02)


async def bench_intake(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    from juki.mesh.tls import secure_channel

    env = IntakeEnvironment(keep=args.keep, profile=args.profile)
    try:
        await env.start()
        municipality = secure_channel(env.prefecture, env.tls("municipality", NAKANO))
        operator = secure_channel(env.prefecture, env.tls("operator", "demo-operator"))
        stub = intake_pb2_grpc.IntakeServiceStub(municipality)
        status_stub = intake_pb2_grpc.IntakeServiceStub(operator)
        admin = await asyncpg.connect(env.pg.admin_url)
        # Warm-up: connections, prepared statements, the relay stream.
        await stream_batches(stub, births(1, args.batch, 0), args.batch, args.in_flight)
        await wait_relayed(status_stub)
        env.start_echo()
        echo_channel = secure_channel(env.echo, env.tls("municipality", NAKANO))
        echo_stub = intake_pb2_grpc.IntakeServiceStub(echo_channel)
        await stream_batches(echo_stub, births(1, args.batch, 0), args.batch, args.in_flight)
        sequence = args.batch + 1
        offset = args.batch
        rates: list[float] = []
        prefecture_rates: list[float] = []
        latencies: list[float] = []
        lags: list[float] = []
        ceilings: list[float] = []
        for _ in range(args.runs):
            messages = births(sequence, args.notifications, offset)
            started = time.perf_counter()
            await stream_batches(echo_stub, messages, args.batch, args.in_flight)
            ceilings.append(len(messages) / (time.perf_counter() - started))
            sequence += args.notifications
            offset += args.notifications
            await admin.execute("DELETE FROM intake_p13.relay_acks")
            started = time.perf_counter()
            run_latencies, answers = await stream_batches(stub, messages, args.batch, args.in_flight)
            acked = time.perf_counter()
            await wait_relayed(status_stub)
            finished = time.perf_counter()
            accepted = sum(1 for a in answers for r in a.results if r.outcome == intake_pb2.NOTIFICATION_OUTCOME_ACCEPTED)
            if accepted != len(messages):
                raise RuntimeError(f"only {accepted} of {len(messages)} accepted")
            rates.append(len(messages) / (finished - started))
            prefecture_rates.append(len(messages) / (acked - started))
            latencies.extend(run_latencies)
            lags.extend(r["max_lag_ms"] for r in await admin.fetch("SELECT max_lag_ms FROM intake_p13.relay_acks"))
        national = await admin.fetchval("SELECT count(*) FROM intake_national.notifications")
        await admin.close()
        await municipality.close()
        await operator.close()
        await echo_channel.close()
        throughput = statistics.median(rates)
        ceiling = statistics.median(ceilings)
        return {
            "benchmark": "intake",
            "throughput": round(throughput, 1),
            "unit": "notifications/s durable at prefecture and national",
            "runs": args.runs,
            "run_throughputs": [round(r, 1) for r in rates],
            "prefecture_ack_throughput": round(statistics.median(prefecture_rates), 1),
            "p50_ms": round(percentile(latencies, 0.50), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "relay_lag_p99_ms": round(percentile(lags, 0.99), 2),
            "notifications_per_run": args.notifications,
            "batch": args.batch,
            "in_flight": args.in_flight,
            "national_notifications": national,
            "ceiling": round(ceiling, 1),
            "ceiling_unit": "notifications/s acknowledged by a bare mTLS grpc.aio echo server, same client and batches",
            "ratio": round(throughput / ceiling, 4),
            "goal": 20_000,
        }
    finally:
        env.close()


async def cmd_bench_intake(args: argparse.Namespace) -> int:
    emit(await bench_intake(args))
    return 0


# -- the echo server (a child process): the ceiling of the machine for this stream shape ---------------

class _EchoServicer(intake_pb2_grpc.IntakeServiceServicer):
    async def StreamNotifications(self, request_iterator: Any, context: Any) -> Any:
        async for request in request_iterator:
            yield intake_pb2.StreamNotificationsResponse(
                batch_id=request.batch_id,
                results=[
                    intake_pb2.NotificationResult(notification_id=n.notification_id, sequence=n.sequence,
                                                  outcome=intake_pb2.NOTIFICATION_OUTCOME_ACCEPTED)
                    for n in request.notifications
                ],
            )


def _add_echo(server: Any) -> None:
    intake_pb2_grpc.add_IntakeServiceServicer_to_server(_EchoServicer(), server)  # type: ignore[abstract]


if __name__ == "__main__":
    asyncio.run(serve_echo(_add_echo))
