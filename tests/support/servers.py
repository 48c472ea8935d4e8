"""Run ASGI apps on real loopback ports (uvicorn in a thread) or real `chat-backend` processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn


def process_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a production-mode `chat-backend` process under test: test secrets, the
    offline model, quiet logs; `extra` adds or overrides variables."""
    from tests.conftest import TEST_MCP_SECRET
    from tests.support.tokens import TEST_AUTH_SECRET

    return {
        "APP_ENV": "production",
        "DATABASE_URL": database_url,
        "AUTH_SECRET": TEST_AUTH_SECRET,
        "MCP_TOKEN_SECRET": TEST_MCP_SECRET,
        "CHAT_MODEL": "offline",
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextmanager
def serve_in_thread(app: Any, port: int | None = None, health_path: str = "/health") -> Iterator[str]:
    """Serve `app` over real HTTP on 127.0.0.1; yields the base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + health_path)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def run_process(args: list[str], env: Mapping[str, str], health_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start `chat-backend ARGS` as a real process with `env` on top of ours; stop it afterwards."""
    full_env = {"WEB_CONCURRENCY": "1", **os.environ, **env}  # one worker unless a test asks for more
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", *args], env=full_env)
    try:
        wait_http(health_url, proc=proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def worker_pids(pid: int) -> list[int]:
    """Worker processes of the `serve` supervisor `pid` (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
    return found
