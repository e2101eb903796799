# syntax=docker/dockerfile:1
# One image for every Juki-net service; the service is the argument:
#   docker run juki lookup
#   docker run juki intake --tier prefecture --prefecture 13
#   docker run --entrypoint juki juki migrate --service lookup
# Kubernetes runs it as uid 10001 with a read-only root filesystem and an emptyDir on /tmp.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: resolve and install the package and its dependencies into a venv ---------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/juki
WORKDIR /src
# .dockerignore admits only what the package build needs (pyproject.toml, README.md, services/).
COPY . .
# A regular (non-editable) install: the runtime stage copies /opt/juki and nothing from /src.
# pip byte-compiles what it installs, so the read-only image never needs to write .pyc files.
# The base dependencies only, no extra: a service needs no embedded PostgreSQL (pgserver: the database
# is a server here), no synthetic population (Faker) and no terminal or PDF output (rich, reportlab).
# `juki --help` fails the build early if the entry point (every command module) cannot import without
# them; `pip show` fails it if any of them came in all the same. The versions are those the tests ran
# with (requirements/lock.txt, refreshed by tools/lock).
RUN PIP_CONSTRAINT=requirements/lock.txt /opt/juki/bin/pip install . \
 && /opt/juki/bin/juki --help >/dev/null \
 && ! /opt/juki/bin/pip show --quiet pgserver Faker rich reportlab 2>/dev/null

# --- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="juki" \
      org.opencontainers.image.description="Juki-net resident registry mesh: every gRPC service, chosen by argument" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid so that runAsNonRoot can verify it and fsGroup matches.
RUN groupadd --system --gid 10001 juki \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin juki
# Same base image as the builder, so the venv's python symlink (/usr/local/bin/python3.11) holds.
COPY --from=builder /opt/juki /opt/juki
ENV PATH=/opt/juki/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    JUKI_DATA_DIR=/tmp/juki \
    JUKI_LISTEN=0.0.0.0:50051 \
    JUKI_HEALTH_LISTEN=0.0.0.0:50052 \
    JUKI_METRICS_LISTEN=0.0.0.0:9464
WORKDIR /tmp
USER 10001:10001
# 50051 gRPC over mTLS; 50052 grpc.health.v1 only, plaintext, for kubelet probes; 9464 /metrics.
EXPOSE 50051 50052 9464
# The server handles SIGTERM itself (it is PID 1): health turns NOT_SERVING, in-flight calls drain
# for JUKI_SHUTDOWN_GRACE_SECONDS, then it exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["juki", "serve"]
CMD ["--help"]
