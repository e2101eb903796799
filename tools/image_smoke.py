"""The image's smoke run (``tools/image smoke``): the mesh's services run from the unpacked image, the
database and the story outside it.

``tools/image smoke`` starts this inside a fresh network namespace that has only a loopback interface.
Here:

* PostgreSQL is the embedded ``pgserver`` started on the host, outside every container; the containers
  reach it through its socket directory, bind-mounted, with ``JUKI_DATABASE_URL`` as in Kubernetes.
* the migrations run from the image (``juki migrate --database-url ...``), as a Kubernetes Job would;
* each service is one container: the image's entrypoint (``juki serve``) with the service as argument,
  run by bubblewrap as uid/gid 10001 (setpriv drops root before bubblewrap starts, so the process is
  10001 on the host too), the image's root read-only, a tmpfs on /tmp (the emptyDir), its own user, PID,
  IPC and UTS namespaces, PID 1 in its PID namespace (so SIGTERM reaches the server as in a pod), and
  only the files it is given mounted in: its certificate and key, the CA and CRL, the socket directory;
* all containers share the loopback-only network namespace, as the containers of one pod would; each
  gets its own ports, and its plaintext health port is probed as a kubelet would;
* then the ``juki demo`` story (seeding, the notification relay, lookups, a batch verification, a card
  and a wide-area copy, the access log's verification, disclosures) runs against them over mTLS.

Exit 0 when every step holds; otherwise 1 with the failing step and the tail of each service's log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from juki.cli import demo
from juki.mesh.client import MeshClient
from juki.mesh.embedded import EmbeddedPostgres, start_embedded
from juki.mesh.supervisor import ChildSpec, MeshLayout, Supervisor, free_port
from juki.seeding.registers import seed_population

# The files a service is handed by path (its Secret and ConfigMap mounts in Kubernetes).
MOUNTED_FILES = (
    "JUKI_TLS_CA_FILE",
    "JUKI_TLS_CERT_FILE",
    "JUKI_TLS_KEY_FILE",
    "JUKI_TLS_CRL_FILE",
    "JUKI_ACCESSLOG_SIGNING_KEY_FILE",
    "JUKI_ACCESSLOG_SIGNING_CERT_FILE",
    "JUKI_PSEUDONYM_KEY_FILE",
    "JUKI_OPERATOR_PASSWORDS_FILE",
)


class SmokeFailure(Exception):
    """A property of the image or a step of the story did not hold."""


@dataclass(frozen=True)
class Image:
    """The unpacked image: its root filesystem and the run configuration of its image config."""

    rootfs: Path
    entrypoint: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    workdir: str

    @classmethod
    def load(cls, bundle: Path) -> Image:
        # The image config (not umoci's runtime config.json, which merges ENTRYPOINT and CMD into one
        # argument list) says which part is the entrypoint.
        oci = bundle.parent / "oci"
        index = json.loads((oci / "index.json").read_text())

        def blob(descriptor: dict[str, Any]) -> dict[str, Any]:
            algorithm, digest = descriptor["digest"].split(":", 1)
            document: dict[str, Any] = json.loads((oci / "blobs" / algorithm / digest).read_text())
            return document

        config = blob(blob(index["manifests"][0])["config"])["config"]
        user, _, group = str(config["User"]).partition(":")
        env = dict(item.split("=", 1) for item in config.get("Env", []))
        return cls(
            rootfs=bundle / "rootfs",
            entrypoint=list(config["Entrypoint"]),
            env=env,
            uid=int(user),
            gid=int(group or user),
            workdir=str(config.get("WorkingDir") or "/"),
        )

    def sandbox(self, *, env: dict[str, str], ro_binds: list[str], rw_binds: list[str],
                info_fd: int | None = None) -> list[str]:
        """The command line that runs one container of this image (the command follows it)."""
        argv = [
            # Drop root first: the container's process is then 10001 on the host as well, with no
            # capabilities anywhere, and bubblewrap can only do what an unprivileged user may.
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--",
            "bwrap",
            "--unshare-user", "--uid", str(self.uid), "--gid", str(self.gid),
            "--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            # No --unshare-net: the run's network namespace (loopback only) is the pod's.
            "--die-with-parent",
            "--ro-bind", str(self.rootfs), "/",
            "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp",
        ]
        for path in ro_binds:
            argv += ["--ro-bind", path, path]
        for path in rw_binds:
            argv += ["--bind", path, path]
        if info_fd is not None:
            argv += ["--info-fd", str(info_fd)]
        argv += ["--clearenv"]
        for key, value in env.items():
            argv += ["--setenv", key, value]
        return [*argv, "--chdir", self.workdir, "--"]


class ImageSupervisor(Supervisor):
    """The local mesh's supervisor, with each service a container of the image instead of a process."""

    def __init__(self, data_dir: Path, layout: MeshLayout, image: Image, database: EmbeddedPostgres,
                 extra_env: dict[str, str]) -> None:
        super().__init__(data_dir, layout, database_url=database.admin_url, extra_env=extra_env,
                         echo=lambda line: print(f"    {line}", flush=True))
        self.image = image
        self.socket_dir = database.socket_dir
        self.health_ports: dict[str, int] = {}
        self.inner_pids: dict[str, int] = {}

    async def prepare(self) -> None:
        await super().prepare()
        # As Kubernetes' fsGroup does for mounted Secrets: the containers' user may read its files.
        for spec in self.specs:
            for path in self._mounted_files(self._env_for(spec)):
                os.chown(path, self.image.uid, self.image.gid)
        os.chown(self.data_dir / "run", self.image.uid, self.image.gid)
        # Directories on the way to those files: traversable, not listable (the CA's key stays unread).
        for directory in [self.data_dir, *(p for p in (self.data_dir / "pki").rglob("*") if p.is_dir())]:
            directory.chmod(0o755 if directory == self.data_dir else 0o711)
        (self.data_dir / "pki").chmod(0o711)
        self.health_ports = {spec.instance: free_port() for spec in self.specs}

    @staticmethod
    def _mounted_files(env: dict[str, str]) -> list[str]:
        return [env[key] for key in MOUNTED_FILES if env.get(key)]

    def container_env(self, spec: ChildSpec) -> dict[str, str]:
        """The image's ENV, then what the supervisor tells the service (its JUKI_* and OTEL_* settings)."""
        given = self._env_for(spec)
        env = dict(self.image.env)
        env.update({k: v for k, v in given.items() if k.startswith(("JUKI_", "OTEL_"))})
        # The image's own data directory (/tmp/juki, on the tmpfs), not the host's.
        env["JUKI_DATA_DIR"] = self.image.env.get("JUKI_DATA_DIR", "/tmp/juki")
        env["JUKI_HEALTH_LISTEN"] = f"127.0.0.1:{self.health_ports[spec.instance]}"
        return env

    async def _spawn(self, spec: ChildSpec) -> asyncio.subprocess.Process:
        env = self.container_env(spec)
        ready = Path(env["JUKI_READY_FILE"])
        ready.unlink(missing_ok=True)
        read_end, write_end = os.pipe()
        sandbox = self.image.sandbox(
            env=env,
            ro_binds=self._mounted_files(env),
            rw_binds=[str(self.data_dir / "run"), self.socket_dir],
            info_fd=write_end,
        )
        argv = [*sandbox, *self.image.entrypoint, *spec.args]
        logfile = open(self.data_dir / "run" / f"{spec.instance}.log", "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                start_new_session=True, pass_fds=(write_end,),
            )
        finally:
            logfile.close()
            os.close(write_end)
        self.processes[spec.instance] = proc
        # bubblewrap reports the host pid of the container's PID 1 (the server) on --info-fd.
        info = await asyncio.to_thread(_read_all, read_end)
        if info:
            self.inner_pids[spec.instance] = int(json.loads(info)["child-pid"])
        deadline = time.monotonic() + 60
        while not ready.is_file():
            if proc.returncode is not None:
                tail = (self.data_dir / "run" / f"{spec.instance}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{spec.instance} exited with {proc.returncode} during start-up:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{spec.instance} did not become ready within 60 s")
            await asyncio.sleep(0.05)
        return proc

    async def stop(self) -> None:
        # SIGTERM goes to each server itself (PID 1 of its container, as the kubelet's stop does);
        # bubblewrap does not pass signals on, and signalling it would kill the server outright.
        self._stopping = True
        for spec in reversed(self.specs):
            pid = self.inner_pids.get(spec.instance)
            proc = self.processes.get(spec.instance)
            if pid is not None and proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for spec in reversed(self.specs):
            proc = self.processes.get(spec.instance)
            if proc is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=20)
        await super().stop()


def _read_all(fd: int) -> str:
    chunks = []
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def check(condition: bool, text: str) -> None:
    if not condition:
        raise SmokeFailure(text)
    print(f"    ✓ {text}", flush=True)


PROBE = """
import json, os, socket
def writes(path):
    try:
        with open(path, "w"):
            pass
        return "ok"
    except OSError as e:
        return e.strerror
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "cap_eff": status["CapEff"].strip(),
    "root": writes("/probe"), "venv": writes("/opt/juki/probe"), "tmp": writes("/tmp/probe"),
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
}))
"""


async def probe_container(image: Image) -> None:
    """What a process of the image sees: its user, a read-only root, a writable /tmp, loopback only."""
    argv = [*image.sandbox(env=image.env, ro_binds=[], rw_binds=[]), "python", "-c", PROBE]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    seen = json.loads(out)
    check(seen["uid"] == image.uid == 10001 and seen["gid"] == image.gid == 10001,
          f"a container's process runs as {seen['uid']}:{seen['gid']}")
    check(int(seen["cap_eff"], 16) == 0, "with no effective capabilities")
    check(seen["root"] != "ok" and seen["venv"] != "ok" and seen["tmp"] == "ok",
          f"its root is read-only (/: {seen['root']}; /opt/juki: {seen['venv']}), /tmp is writable")
    check(seen["interfaces"] == ["lo"], f"its only network interface is loopback: {seen['interfaces']}")


async def probe_health(supervisor: ImageSupervisor) -> None:
    """Every container answers grpc.health.v1 on its plaintext health port, as a kubelet probe asks."""
    for spec in supervisor.specs:
        address = f"127.0.0.1:{supervisor.health_ports[spec.instance]}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise SmokeFailure(f"{spec.instance}'s health port says {reply.status}")
    print(f"    ✓ {len(supervisor.specs)} containers SERVING on their health ports", flush=True)


def host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise SmokeFailure(f"no Uid line for pid {pid}")


async def migrate_from_image(image: Image, database: EmbeddedPostgres) -> None:
    """`juki migrate` from the image against the outside database (a Kubernetes Job's work)."""
    env = dict(image.env)
    sandbox = image.sandbox(env=env, ro_binds=[], rw_binds=[database.socket_dir])
    argv = [*sandbox, "juki", "migrate", "--database-url", database.admin_url]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise SmokeFailure(f"juki migrate from the image exited {proc.returncode}:\n{text[-3000:]}")
    applied = [line.split()[0] for line in text.splitlines() if " applied " in f" {line} "]
    check(
        len(applied) >= 9,
        f"juki migrate (from the image) applied the migrations of {len(applied)} instances",
    )


async def run(bundle: Path, population: int) -> None:
    started = time.monotonic()
    image = Image.load(bundle)
    print(f"image {bundle}: entrypoint {image.entrypoint}, user {image.uid}:{image.gid}", flush=True)
    # Under /tmp, so the same paths exist inside the containers (on their tmpfs) when bind-mounted.
    data_dir = Path(tempfile.mkdtemp(prefix="juki-image-smoke-", dir="/tmp"))
    data_dir.chmod(0o755)  # mkdtemp's 0700 would keep the containers' user from their mounts
    database: EmbeddedPostgres | None = None
    supervisor: ImageSupervisor | None = None
    try:
        print("\n[a] the image's sandbox", flush=True)
        await probe_container(image)

        print("\n[b] PostgreSQL outside the containers, migrations from the image", flush=True)
        database = await asyncio.to_thread(start_embedded, data_dir / "db")
        os.chmod(database.socket_dir, 0o755)  # the containers' user connects through it
        await migrate_from_image(image, database)

        print("\n[c] one container per service", flush=True)
        supervisor = ImageSupervisor(
            data_dir / "mesh",
            MeshLayout(prefectures=("13", "14"), municipalities=(demo.NAKANO, demo.YOKOHAMA)),
            image, database, extra_env={"JUKI_CLOCK": demo.DEMO_DAY.isoformat()},
        )
        await supervisor.prepare()
        await supervisor.start()
        uids = {host_uid(pid) for pid in supervisor.inner_pids.values()}
        check(len(supervisor.inner_pids) == len(supervisor.specs) and uids == {image.uid},
              f"{len(supervisor.inner_pids)} servers, each PID 1 of its container, run as host uid {uids}")
        await probe_health(supervisor)
        print(f"    mesh up after {time.monotonic() - started:.1f} s", flush=True)

        print("\n[d] the demo's story against the containers", flush=True)
        summary = await seed_population(supervisor, population, 20020805,
                                        echo=lambda line: print(f"    {line}", flush=True))
        print(f"    ✓ {summary}", flush=True)
        agency = MeshClient(supervisor.data_dir, "agency")
        operator = MeshClient(supervisor.data_dir, "operator")
        try:
            await demo._story(demo.Story(agency, operator), supervisor)
        finally:
            await agency.close()
            await operator.close()

        # The supervisor restarts a container that dies, as Kubernetes would; in the smoke run none may.
        check(not supervisor.restarts, f"no container died during the story (restarts: {supervisor.restarts})")

        print("\n[e] stop: SIGTERM to every server", flush=True)
        await supervisor.stop()
        codes = {spec.instance: supervisor.processes[spec.instance].returncode for spec in supervisor.specs}
        check(all(code == 0 for code in codes.values()), f"every container exited 0 after SIGTERM: {codes}")
        print(f"\n✓ the image's smoke run held in {time.monotonic() - started:.1f} s", flush=True)
    except BaseException:
        if supervisor is not None:
            for spec in supervisor.specs:
                log = supervisor.data_dir / "run" / f"{spec.instance}.log"
                if log.is_file():
                    print(f"\n--- {spec.instance}.log (tail)\n{log.read_text(errors='replace')[-1500:]}")
        raise
    finally:
        if supervisor is not None:
            await supervisor.stop()
        if database is not None:
            await asyncio.to_thread(database.stop)
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True, help="the unpacked image (tools/image build)")
    parser.add_argument("--population", type=int, default=600, help="seeded residents (as `juki demo`)")
    args = parser.parse_args()
    try:
        asyncio.run(run(args.bundle.resolve(), args.population))
    except (SmokeFailure, demo.DemoFailure, RuntimeError) as exc:
        print(f"\n✗ the image's smoke run failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
