"""How `chat-backend serve` and `chat-backend mcp` run uvicorn: one place for the HTTP server's settings.

Both processes get the same protections (header limits and header read timeout from
`http_protocol`, a bounded keep-alive, no `server: uvicorn` banner). The API runs `WEB_CONCURRENCY`
worker processes: uvicorn's supervisor binds the socket once and each worker builds its own app from
the environment through the `api_app` factory, so nothing but the environment crosses processes.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from backend.config import Settings, load_settings
from backend.http_protocol import HeaderLimits, LimitedHttpToolsProtocol

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ServerConfig(uvicorn.Config):
    """uvicorn's `Config` plus the header limits the protocol reads (it is pickled into each worker)."""

    def __init__(self, app: Any, *, header_limits: HeaderLimits, **kwargs: Any) -> None:
        super().__init__(app, http=LimitedHttpToolsProtocol, **kwargs)
        self.header_limits = header_limits


def _common(settings: Settings) -> dict[str, Any]:
    return {
        "header_limits": HeaderLimits(
            max_bytes=settings.max_header_bytes,
            max_count=settings.max_header_count,
            timeout_seconds=settings.header_timeout_seconds,
        ),
        "server_header": False,
        "log_level": settings.log_level.lower(),
        # uvicorn's loggers propagate to the handler backend/logging_setup.py installs (text or JSON).
        "log_config": None,
        # Longer than any load balancer's idle timeout (nginx, ALB: 60 s), so the server is never the
        # one closing a kept-alive connection just as a request arrives on it (a reset under load).
        "timeout_keep_alive": settings.keep_alive_seconds,
    }


def api_config(settings: Settings, workers: int | None = None) -> ServerConfig:
    """The API server: `workers` processes (default `settings.workers`), each building the app itself."""
    return ServerConfig(
        "backend.server:api_app",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        workers=workers or settings.workers,
        # uvicorn's 5 s default kills and respawns a worker still importing on a busy machine, in a loop.
        timeout_worker_healthcheck=60,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
        **_common(settings),
    )


def mcp_config(settings: Settings, app: ASGIApp) -> ServerConfig:
    """The MCP server: one process (its work per turn is small next to the API's)."""
    return ServerConfig(
        app,
        host=settings.mcp_bind_host or settings.mcp_host,
        port=settings.mcp_port,
        timeout_graceful_shutdown=5,
        **_common(settings),
    )


def run(config: ServerConfig) -> None:
    """`uvicorn.run` for a ready `Config`: a supervisor with workers, or the server in this process."""
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
            return
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down
        return
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def api_app() -> ASGIApp:
    """The factory each API worker calls: the app for the settings in the environment."""
    _exit_with_supervisor()
    from backend import metrics
    from backend.logging_setup import configure_logging
    from backend.main import create_app

    settings = load_settings()
    configure_logging(settings)
    atexit.register(metrics.mark_process_dead, os.getpid())
    return freeze_after_startup(create_app(settings))


def freeze_after_startup(app: ASGIApp) -> ASGIApp:
    """Move what start-up built (LiteLLM, the SDKs, pydantic models: ~400,000 objects) out of the
    garbage collector's reach once the app reports it started. Without it every full collection walks
    them all (~100 ms each) in the middle of someone's turn; they live as long as the process anyway."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                gc.collect()
                gc.freeze()
            await send(message)

        await app(scope, receive, watch)

    return wrapped


MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def metrics_dir(workers: int) -> Iterator[None]:
    """Where several API workers keep their metrics, so a scrape of any one sums them all.

    Set before the workers start (they inherit the environment and prometheus-client reads it at
    import). An operator's own `PROMETHEUS_MULTIPROC_DIR` is used and emptied (values of an earlier
    run must not be added to this one's); otherwise a temporary directory lives as long as this run.
    """
    given = os.environ.get(MULTIPROC_DIR)
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        yield
        return
    if workers <= 1:
        yield
        return
    path = tempfile.mkdtemp(prefix="chat-backend-metrics-")
    os.environ[MULTIPROC_DIR] = path
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_DIR, None)
        shutil.rmtree(path, ignore_errors=True)


def _exit_with_supervisor() -> None:
    """In a worker process, die with the supervisor: a killed `serve` must not leave workers serving."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent.pid:  # the supervisor was gone before the request took effect
        os._exit(1)
