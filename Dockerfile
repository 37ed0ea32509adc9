# cdcfeed container image.
#
# Two stages: the builder installs the package into a virtualenv with the same command the
# README gives (`pip install .`); the runtime stage copies only that virtualenv onto a clean
# base of the same tag, so compilers, caches and the source tree never reach the image.

FROM python:3.11-slim AS builder

# A venv keeps the install relocatable between stages: the runtime stage has the same
# interpreter at the same path, so /opt/venv works there unchanged.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

WORKDIR /src
# Only what the build backend reads (see .dockerignore); pyproject names README.md as readme.
COPY pyproject.toml README.md ./
COPY daemon/ daemon/
RUN pip install .


FROM python:3.11-slim

LABEL org.opencontainers.image.title="cdcfeed" \
      org.opencontainers.image.description="Rate-controlled order load for PostgreSQL with an LSN ledger that proves CDC delivery" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it and fsGroup matches.
RUN groupadd --system --gid 10001 cdcfeed \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cdcfeed \
        --no-create-home --shell /usr/sbin/nologin cdcfeed \
 && mkdir -p /var/lib/cdcfeed/feed /etc/cdcfeed \
 && chown -R 10001:10001 /var/lib/cdcfeed

COPY --from=builder /opt/venv /opt/venv

# The daemon reads /etc/cdcfeed/cdcfeed.toml by itself when the file exists (mount one
# there, or point CDCFEED_CONFIG / --config elsewhere); these are the container defaults
# beneath it. Metrics must listen on all interfaces so Prometheus and the kubelet reach
# them; the feed files go to the volume below.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/cdcfeed \
    CDCFEED_METRICS__ADDRESS=0.0.0.0:9651 \
    CDCFEED_FEED__DIR=/var/lib/cdcfeed/feed

VOLUME ["/var/lib/cdcfeed/feed"]
WORKDIR /var/lib/cdcfeed
USER 10001:10001
EXPOSE 9651

# slim has no curl; the interpreter is already there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9651/healthz', timeout=4)"]

# Exec form: cdcfeed is PID 1 and receives SIGTERM itself, so `docker stop` and pod
# termination start its graceful shutdown instead of a SIGKILL after the timeout.
ENTRYPOINT ["cdcfeed"]
CMD ["run"]
