"""The one HTTP address: /metrics (Prometheus text), /healthz (alive), /readyz (ready to load).

It runs prometheus-client's threaded WSGI server in a daemon thread, so a slow scrape never
delays a batch on the event loop; readiness is read from plain attributes the loop sets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from cdcfeed.config import split_address
from cdcfeed.errors import UserError
from cdcfeed.metrics import Metrics

# Batches the server refused in a row (a privilege revoked, say) before /readyz says not
# ready: one refusal among completed batches is that batch's trouble, not the daemon's.
REFUSALS_NOT_READY = 3


@dataclass
class Readiness:
    database_up: bool = False
    scheduler_running: bool = False
    refused_in_a_row: int = 0

    @property
    def refusing(self) -> bool:
        """Every recent batch was refused: the daemon runs, but loads nothing."""
        return self.refused_in_a_row >= REFUSALS_NOT_READY

    @property
    def ready(self) -> bool:
        return self.database_up and self.scheduler_running and not self.refusing

    def batch_refused(self) -> None:
        self.refused_in_a_row += 1

    def batch_completed(self) -> None:
        self.refused_in_a_row = 0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Endpoint:
    def __init__(self, address: str, metrics: Metrics, readiness: Readiness) -> None:
        self.host, self.requested_port = split_address(address)
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._readiness = readiness
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            state = self._readiness
            if state.ready:
                return _text(start_response, "200 OK", "ready\n")
            body = (
                f"not ready: database_up={state.database_up} "
                f"scheduler_running={state.scheduler_running} "
                f"batches_refused={state.refusing}\n"
            )
            return _text(start_response, "503 Service Unavailable", body)
        if path == "/metrics":
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        return _text(start_response, "404 Not Found", "try /metrics, /healthz or /readyz\n")

    def start(self) -> None:
        server_class = ThreadingWSGIServer
        if ":" in self.host:
            import socket

            class _V6(ThreadingWSGIServer):
                address_family = socket.AF_INET6

            server_class = _V6
        try:
            self._server = make_server(
                self.host, self.requested_port, self._app, server_class, _QuietHandler
            )
        except OSError as exc:
            raise UserError(
                "metrics.address",
                f"cannot listen on {self.host}:{self.requested_port} ({exc.strerror}); "
                "choose a free port, or port 0 for any",
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cdcfeed-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
