"""A real PostgreSQL for the tests: the server at 127.0.0.1:5432 when there is one, else the embedded one.

Each test gets its own database cloned from a template that was migrated once (CREATE DATABASE ...
TEMPLATE is a file copy: a few tens of milliseconds), so tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg2
from alembic import command
from psycopg2 import sql

from backend.cli import alembic_config
from backend.pgserver import start_embedded, stop_embedded, tcp_reachable, with_database

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_DIR = ROOT / ".data" / "test"


def admin_url() -> tuple[str, bool]:
    """libpq URL of a maintenance database on the test server, and whether we started it."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        return url, False
    if tcp_reachable("127.0.0.1", 5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres", False
    return start_embedded(EMBEDDED_DIR), True


def stop_test_server() -> None:
    stop_embedded(EMBEDDED_DIR)


def _admin(url: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def create_template(url: str) -> str:
    name = f"chat_tpl_{uuid.uuid4().hex[:10]}"
    conn = _admin(url)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()
    command.upgrade(alembic_config(with_database(url, name)), "head")
    return name


def clone(url: str, template: str) -> str:
    name = f"chat_t_{uuid.uuid4().hex[:12]}"
    conn = _admin(url)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    conn.close()
    return name


def drop(url: str, name: str) -> None:
    conn = _admin(url)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()
