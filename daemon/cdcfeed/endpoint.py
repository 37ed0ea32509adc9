"""The one HTTP address: /metrics (Prometheus text), /healthz (alive), /readyz (ready to load).

A small HTTP/1.1 server on an event loop of its own, in one daemon thread. Why this shape:

- Its own thread, not the load's event loop: above its capacity the daemon's loop is as busy
  as it gets, and that is when a liveness probe must still be answered. The interpreter hands
  the GIL over every few milliseconds, so /healthz answers however busy the loop is; readiness
  is read from plain attributes the loop sets.
- One loop for every connection, not a thread each (as a threaded WSGI server gives): an
  idle connection costs a few kilobytes, never a thread. Connections are closed after
  `idle_timeout` seconds without a complete request, and at most `max_connections` are open:
  at the bound, a new one closes the longest-idle one when that has waited EVICT_SECONDS for
  a request, or waits in the accept queue until one ends; so idle sockets held open can delay
  a scrape by about EVICT_SECONDS, never starve it.
- A listen backlog of BACKLOG: a burst of scrapes waits in the kernel's accept queue, where a
  backlog of 5 drops their SYNs and each dropped one costs its client a second's retransmit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted

from cdcfeed.config import split_address
from cdcfeed.errors import UserError
from cdcfeed.metrics import Metrics

# Longer than the usual scrape interval (15 s), so that a scraper's keep-alive connection is
# reused between scrapes; a connection that sends nothing for this long is closed.
IDLE_SECONDS = 30.0
MAX_CONNECTIONS = 256  # far above scrapers and probes; a quarter of the usual 1024 fds
BACKLOG = 1024  # the kernel caps it at net.core.somaxconn (4096 on current kernels)
MAX_HEAD_BYTES = 16 * 1024
# At the bound, a connection idle this long makes room for a new one. Long enough for a
# connection of a burst to send its request, short enough that nobody waits long.
EVICT_SECONDS = 1.0  # request line and headers; a longer head is refused
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


@dataclass(frozen=True, slots=True)
class _Response:
    status: str
    body: bytes
    content_type: str = "text/plain"
    gzipped: bool = False


class Endpoint:
    def __init__(
        self,
        address: str,
        metrics: Metrics,
        readiness: Readiness,
        *,
        idle_timeout: float = IDLE_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.host, self.requested_port = split_address(address)
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._registry = metrics.registry
        self._readiness = readiness
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Open connections: since when each has waited for a request, None while answering one.
        self._idle_since: dict[asyncio.StreamWriter, float | None] = {}
        self._room = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._thread is not None, "the endpoint is not started"
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._idle_since)

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server(
                (self.host, self.requested_port), family=family, backlog=BACKLOG
            )
        except OSError as exc:
            raise UserError(
                "metrics.address",
                f"cannot listen on {self.host}:{self.requested_port} "
                f"({exc.strerror or exc}); choose a free port, or port 0 for any",
            ) from None
        self._port = int(sock.getsockname()[1])
        loop = asyncio.new_event_loop()
        serving = threading.Event()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run, args=(loop, sock, serving), name="cdcfeed-http", daemon=True
        )
        self._thread.start()
        serving.wait(timeout=5)  # connections queue in the backlog meanwhile, so no matter

    def _run(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, serving: threading.Event
    ) -> None:
        asyncio.set_event_loop(loop)
        sock.setblocking(False)
        try:
            accepting = loop.create_task(self._accept(sock), name="accept")
            serving.set()
            loop.run_forever()
            # Stopped: end the accept loop and the connections' handlers, then the loop.
            handlers = {accepting, *self._handlers}
            for handler in handlers:
                handler.cancel()
            loop.run_until_complete(asyncio.gather(*handlers, return_exceptions=True))
        finally:
            sock.close()
            loop.close()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = None
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            loop.call_soon_threadsafe(self._close)
        thread.join(timeout=5)

    def _close(self) -> None:
        for writer in list(self._idle_since):
            writer.transport.abort()
        asyncio.get_running_loop().stop()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while len(self._idle_since) >= self.max_connections and not self._evict():
                # Leave the next one in the kernel's queue until a connection ends, or the
                # longest-idle one has waited long enough to be closed for it.
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), timeout=EVICT_SECONDS / 4)
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError:
                # Out of file descriptors, say: the endpoint must outlive it.
                await asyncio.sleep(0.1)
                continue
            try:
                reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_HEAD_BYTES)
            except OSError:  # the client went away before it was accepted
                conn.close()
                continue
            self._idle_since[writer] = time.monotonic()
            handler = loop.create_task(self._serve(reader, writer))
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)

    def _evict(self) -> bool:
        """Closes the longest-idle connection if it has waited EVICT_SECONDS; True if closed."""
        now = time.monotonic()
        waited, writer = max(
            (
                (now - since, writer)
                for writer, since in self._idle_since.items()
                if since is not None
            ),
            default=(0.0, None),
            key=lambda pair: pair[0],
        )
        if writer is None or waited < EVICT_SECONDS:
            return False
        writer.transport.abort()  # its handler sees the end of the stream and exits
        del self._idle_since[writer]
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(
                        reader.readuntil(b"\r\n\r\n"), timeout=self.idle_timeout
                    )
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return  # idle too long, or the client went away
                except asyncio.LimitOverrunError:
                    writer.write(
                        _head(_Response("431 Request Header Fields Too Large", b""), False)
                    )
                    return
                if writer not in self._idle_since:
                    return  # closed to make room as the request came in
                self._idle_since[writer] = None
                response, keep_alive, method = self._answer(head)
                writer.write(_head(response, keep_alive))
                if method != "HEAD":
                    writer.write(response.body)
                try:
                    await asyncio.wait_for(writer.drain(), timeout=self.idle_timeout)
                except (TimeoutError, ConnectionError):
                    return
                if not keep_alive:
                    return
                self._idle_since[writer] = time.monotonic()
        finally:
            self._idle_since.pop(writer, None)  # gone already if closed to make room
            self._room.set()
            writer.close()

    def _answer(self, head: bytes) -> tuple[_Response, bool, str]:
        """(response, keep the connection open?, method) for one request head."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _Response("400 Bad Request", b"bad request line\n"), False, "GET"
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        # A body is never expected; one that came is not read, so the connection ends.
        keep_alive = (
            version == "HTTP/1.1"
            and headers.get("connection", "").lower() != "close"
            and "content-length" not in headers
            and "transfer-encoding" not in headers
        )
        if method not in ("GET", "HEAD"):
            return _Response("405 Method Not Allowed", b"GET or HEAD\n"), False, method
        url = urlsplit(target)
        return self._route(url.path, url.query, headers), keep_alive, method

    def _route(self, path: str, query: str, headers: dict[str, str]) -> _Response:
        if path == "/healthz":
            return _Response("200 OK", b"ok\n")
        if path == "/readyz":
            state = self._readiness
            if state.ready:
                return _Response("200 OK", b"ready\n")
            body = (
                f"not ready: database_up={state.database_up} "
                f"scheduler_running={state.scheduler_running} "
                f"batches_refused={state.refusing}\n"
            )
            return _Response("503 Service Unavailable", body.encode())
        if path == "/metrics":
            # As prometheus-client's own exposition: the format the Accept header asks for,
            # ?name[]= to pick series, gzip when accepted.
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            registry = self._registry
            names = parse_qs(query).get("name[]")
            if names:
                registry = registry.restricted_registry(names)  # type: ignore[assignment]
            output = encoder(registry)
            if gzip_accepted(headers.get("accept-encoding", "")):
                return _Response("200 OK", gzip.compress(output), content_type, gzipped=True)
            return _Response("200 OK", output, content_type)
        return _Response("404 Not Found", b"try /metrics, /healthz or /readyz\n")


def _head(response: _Response, keep_alive: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    if response.gzipped:
        lines.append("Content-Encoding: gzip")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
