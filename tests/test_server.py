"""The HTTP servers of `chat-backend serve` and `chat-backend mcp`, as real processes on loopback ports.

Oversized and slow request heads are refused before the app runs (and cost no memory), idle
connections are closed, there is no `server` banner, and `serve` runs WEB_CONCURRENCY worker
processes that all answer and all stop with it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from tests.support import db
from tests.support.servers import free_port, process_env, wait_http, worker_pids
from tests.support.tokens import auth

LIMITS = {"MAX_HEADER_BYTES": "16384", "MAX_HEADER_COUNT": "100", "HEADER_TIMEOUT_SECONDS": "1"}


def _env(database_url: str, **extra: str) -> dict[str, str]:
    return process_env(database_url, **{"WEB_CONCURRENCY": "1", **LIMITS, **extra})


@contextmanager
def _process(command: str, env: dict[str, str], base: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`chat-backend COMMAND` with all its workers up (each imports the whole stack: slow on a busy machine)."""
    base = base or f"http://127.0.0.1:{env['API_PORT']}"
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", command], env={**os.environ, **env})
    try:
        wait_http(f"{base}/health", timeout=120, proc=proc)
        deadline = time.monotonic() + 120
        workers = int(env["WEB_CONCURRENCY"]) if command == "serve" else 1
        while workers > 1 and len(worker_pids(proc.pid)) < workers:  # with one, `serve` is the worker
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(pg_admin_url: str, template_db: str) -> Iterator[dict[str, tuple[str, int]]]:
    """One `serve` and one `mcp` process for the module: {"api"|"mcp": (base URL, pid)}."""
    name = db.clone(pg_admin_url, template_db)
    api_port, mcp_port = free_port(), free_port()
    env = _env(db.with_database(pg_admin_url, name), API_PORT=str(api_port), KEEP_ALIVE_SECONDS="1")
    env["MCP_URL"] = f"http://127.0.0.1:{mcp_port}/mcp"
    try:
        with _process("mcp", env, f"http://127.0.0.1:{mcp_port}") as mcp, _process("serve", env) as api:
            yield {"api": (f"http://127.0.0.1:{api_port}", api.pid), "mcp": (f"http://127.0.0.1:{mcp_port}", mcp.pid)}
    finally:
        db.drop(pg_admin_url, name)


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=15)


def _exchange(base: str, head: bytes) -> bytes:
    """Send a raw request head; return everything the server answers until it closes."""
    with _connect(base) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("process", ["api", "mcp"])
def test_normal_requests_work_without_a_banner(servers: dict[str, tuple[str, int]], process: str) -> None:
    base, _ = servers[process]
    response = httpx.get(f"{base}/health", headers={"X-Fine": "a" * 8000})
    assert response.status_code == 200
    assert "server" not in response.headers
    if process == "api":
        listed = httpx.get(f"{base}/api/conversations", headers=auth("alice"))
        assert listed.status_code == 200, listed.text


@pytest.mark.parametrize("process", ["api", "mcp"])
def test_oversized_and_too_many_headers_are_refused(servers: dict[str, tuple[str, int]], process: str) -> None:
    base, _ = servers[process]
    big = httpx.get(f"{base}/health", headers={"X-Big": "a" * 20_000})
    assert big.status_code == 431
    assert big.json()["code"] == "headers_too_large" and "16384" in big.json()["detail"]
    assert big.headers["connection"] == "close"

    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    answer = _exchange(base, many)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"code":"headers_too_large"' in answer

    # A head that never ends is refused once it passes the limit, not buffered to the end.
    endless = b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 200_000
    with _connect(base) as sock:
        with suppress(OSError):  # the server may close before we finish: that is the point
            sock.sendall(endless)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_a_slow_header_sender_is_disconnected(servers: dict[str, tuple[str, int]]) -> None:
    base, _ = servers["api"]
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 300
    answer = b""
    with _connect(base) as sock:
        for i in range(len(head)):  # one byte every 50 ms: the whole head would take 17 s
            try:
                sock.sendall(head[i : i + 1])
            except OSError:
                break
            if select.select([sock], [], [], 0.05)[0]:
                answer = sock.recv(65536)
                break
        sent = i
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"code":"request_timeout"' in answer
    assert sent < len(head) - 1  # refused before the head was complete

    # A connection that sends nothing at all is closed too (HEADER_TIMEOUT_SECONDS=1 here).
    with _connect(base) as sock:
        assert sock.recv(1) == b""


def test_idle_keep_alive_connections_are_closed(servers: dict[str, tuple[str, int]]) -> None:
    base, _ = servers["api"]
    with _connect(base) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):  # the whole JSON answer, however the server splits its writes
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 ")
        assert sock.recv(65536) == b""  # KEEP_ALIVE_SECONDS=1: the server closes the idle connection


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_huge_headers_do_not_grow_memory(servers: dict[str, tuple[str, int]]) -> None:
    base, pid = servers["api"]
    httpx.get(f"{base}/health")
    before = _rss_kib(pid)
    chunk = b"a" * 65536

    def send_16_mib(sock: socket.socket) -> None:
        with suppress(OSError):  # refused and closed early
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Huge: ")
            for _ in range(256):
                sock.sendall(chunk)

    sockets = [_connect(base) for _ in range(20)]
    try:
        threads = [threading.Thread(target=send_16_mib, args=(sock,)) for sock in sockets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        grown_mib = (_rss_kib(pid) - before) / 1024  # measured while the clients still hold their connections
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(f"{base}/health").status_code == 200
    # Unbounded, httptools held all 320 MiB (198 -> 587 MB measured); now each connection stops at the limit.
    assert grown_mib < 32, f"RSS grew by {grown_mib:.0f} MiB"


# --- worker processes ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _server_sockets_of(client_ports: set[int], server_port: int) -> set[str]:
    """Inodes of the server-side TCP sockets connected to our client ports."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        if local_port == server_port and remote_port in client_ports:
            inodes.add(fields[9])
    return inodes


def test_serve_runs_workers_that_all_answer_and_die_with_it(database_url: str) -> None:
    port = free_port()
    env = _env(database_url, API_PORT=str(port), WEB_CONCURRENCY="2", MCP_URL=f"http://127.0.0.1:{free_port()}/mcp")
    with _process("serve", env) as serve:
        workers = worker_pids(serve.pid)
        assert len(workers) == 2, workers

        # New connections until each worker has answered one (the second may still be starting up).
        answered: dict[int, int] = dict.fromkeys(workers, 0)
        deadline = time.monotonic() + 120
        while not all(answered.values()) and time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
                ours = _server_sockets_of({sock.getsockname()[1]}, port)
                (owner,) = [w for w in workers if _socket_inodes(w) & ours]
                answered[owner] += 1
        assert all(answered.values()), f"requests answered per worker: {answered}"

        # A killed `serve` takes its workers with it: nothing keeps answering on its port.
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait()
        deadline = time.monotonic() + 30
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers))
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


async def test_what_start_up_built_is_frozen_out_of_the_collector_once_started() -> None:
    """Both servers wrap their app so the objects built at start-up leave the collector's reach (a full
    collection would walk them all in someone's turn), after the app's start-up, not before it."""
    import gc

    from backend.server import freeze_after_startup

    seen: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        seen.append(gc.get_freeze_count())  # start-up itself: nothing frozen yet
        await send({"type": "lifespan.startup.complete"})

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)
        seen.append(gc.get_freeze_count())

    gc.unfreeze()
    try:
        await freeze_after_startup(app)({"type": "lifespan"}, receive, send)
    finally:
        gc.unfreeze()
    assert sent == [{"type": "lifespan.startup.complete"}]
    assert seen[0] == 0 and seen[1] > 10_000
