"""The metrics endpoint under many connections: idle ones are bounded and time out, a burst of
scrapes is served at once, and /healthz answers while the daemon's own loop is busy."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from cdcfeed.endpoint import BACKLOG, Endpoint, Readiness
from cdcfeed.metrics import Metrics

IDLE_TIMEOUT = 1.0


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    served = Endpoint(
        "127.0.0.1:0", Metrics(), Readiness(), idle_timeout=IDLE_TIMEOUT, max_connections=64
    )
    served.start()
    yield served
    served.stop()


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _until(condition: Callable[[], bool], deadline: float, what: str) -> None:
    give_up = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < give_up, f"not within {deadline}s: {what}"
        time.sleep(0.05)


def _closed_by_server(conn: socket.socket) -> bool:
    conn.setblocking(False)
    try:
        return conn.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_idle_connections_take_no_thread_each_are_bounded_and_time_out(
    endpoint: Endpoint,
) -> None:
    me = psutil.Process()
    threads_before = me.num_threads()
    idle = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(300)]
    try:
        # A new connection beyond the bound closes the longest-idle one: never more are open.
        _until(lambda: endpoint.connections == 64, 10, "the server took up to its bound")
        assert me.num_threads() <= threads_before + 1
        # A scrape still gets through: it takes the place of an idle connection.
        assert _get(f"{endpoint.url}/healthz") == (200, b"ok\n")
        # Every idle connection is closed by the server once idle_timeout has passed.
        _until(
            lambda: all(_closed_by_server(conn) for conn in idle),
            IDLE_TIMEOUT + 10,
            "the server closed every idle connection",
        )
        assert endpoint.connections == 0
        assert me.num_threads() <= threads_before + 1
    finally:
        for conn in idle:
            conn.close()


def test_a_request_trickled_in_is_cut_off_after_the_idle_timeout(endpoint: Endpoint) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port)) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        started = time.monotonic()
        _until(lambda: _closed_by_server(conn), IDLE_TIMEOUT + 10, "the server closed it")
        assert time.monotonic() - started >= IDLE_TIMEOUT * 0.5


def test_a_keep_alive_connection_serves_one_request_after_another(endpoint: Endpoint) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as conn:
        replies = conn.makefile("rb")
        for path, body in (("/healthz", b"ok\n"), ("/readyz", b"not ready"), ("/x", b"try")):
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status = replies.readline()
            headers = {}
            while (line := replies.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            assert headers["connection"] == "keep-alive", status
            assert replies.read(int(headers["content-length"])).startswith(body)
        conn.sendall(b"HEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert replies.readline() == b"HTTP/1.1 200 OK\r\n"
        rest = replies.read()  # the server closes the connection after the head: no body
        assert b"Content-Type: text/plain; version=0.0.4" in rest and rest.endswith(b"\r\n\r\n")


def test_a_burst_of_200_parallel_scrapes_is_served(endpoint: Endpoint) -> None:
    def scrape(_: int) -> tuple[int, bytes, float]:
        started = time.monotonic()
        status, body = _get(f"{endpoint.url}/metrics", timeout=30)
        return status, body, time.monotonic() - started

    go = threading.Barrier(200)

    def scrape_together(number: int) -> tuple[int, bytes, float]:
        go.wait()
        return scrape(number)

    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(scrape_together, range(200)))
    assert all(status == 200 for status, _, _ in results)
    assert all(b"cdcfeed_database_up" in body for _, body, _ in results)
    # Generous: only a scrape that waited for a dropped SYN's retransmits comes near it.
    assert max(seconds for _, _, seconds in results) < 15
    assert BACKLOG >= 128
    listen_queue = _listen_backlog(endpoint.port)
    if listen_queue is not None:
        assert listen_queue >= 128


def _listen_backlog(port: int) -> int | None:
    """The listening socket's backlog as the kernel has it (ss shows it as Send-Q)."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    listing = subprocess.run(
        [ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(listing[2])


def test_healthz_answers_while_the_daemon_s_loop_is_busy(endpoint: Endpoint) -> None:
    answers: list[float] = []

    def probe() -> None:
        for _ in range(5):
            started = time.monotonic()
            assert _get(f"{endpoint.url}/healthz") == (200, b"ok\n")
            answers.append(time.monotonic() - started)

    prober = threading.Thread(target=probe)
    busy_until = time.monotonic() + 30
    prober.start()
    while prober.is_alive() and time.monotonic() < busy_until:
        sum(range(10_000))  # this thread holds the interpreter, as a busy event loop does
    prober.join()
    assert len(answers) == 5
    assert max(answers) < 5


def test_a_taken_port_is_one_line_naming_the_setting(endpoint: Endpoint) -> None:
    with pytest.raises(Exception, match=r"metrics.address: cannot listen on 127.0.0.1:\d+"):
        Endpoint(f"127.0.0.1:{endpoint.port}", Metrics(), Readiness()).start()
