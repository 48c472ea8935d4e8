"""The whole stack as real processes: `chat-backend mcp` + `chat-backend serve` + PostgreSQL + offline model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from tests.support.servers import free_port, process_env, run_process
from tests.support.tokens import auth

ALICE, BOB = auth("alice"), auth("bob")


def _env(database_url: str, mcp_port: int, api_port: int, **extra: str) -> dict[str, str]:
    return process_env(database_url, MCP_URL=f"http://127.0.0.1:{mcp_port}/mcp", API_PORT=str(api_port), **extra)


@contextmanager
def stack(database_url: str, **extra: str) -> Iterator[tuple[dict[str, str], str]]:
    mcp_port, api_port = free_port(), free_port()
    env = _env(database_url, mcp_port, api_port, **extra)
    with (
        run_process(["mcp"], env, f"http://127.0.0.1:{mcp_port}/health"),
        run_process(["serve"], env, f"http://127.0.0.1:{api_port}/health"),
    ):
        yield env, f"http://127.0.0.1:{api_port}"


def chat(
    base: str, message: str, conversation_id: str | None = None, headers: dict[str, str] = ALICE
) -> httpx.Response:
    return httpx.post(
        f"{base}/api/chat", json={"message": message, "conversation_id": conversation_id}, headers=headers, timeout=30
    )


def result(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["tool_calls"][0]["result"]


def test_tasks_by_chat_across_an_api_restart(database_url: str, engine: Engine) -> None:
    mcp_port = free_port()
    ports = [free_port(), free_port()]
    envs = [_env(database_url, mcp_port, port) for port in ports]
    with run_process(["mcp"], envs[0], f"http://127.0.0.1:{mcp_port}/health"):
        with run_process(["serve"], envs[0], f"http://127.0.0.1:{ports[0]}/health"):
            base = f"http://127.0.0.1:{ports[0]}"
            assert httpx.get(f"{base}/health/ready").json()["checks"] == {"database": True, "mcp": True}
            first = chat(base, "add buy milk")
            cid = first.json()["conversation_id"]
            assert result(first) == {"task_id": 1, "status": "created", "title": "buy milk"}
            assert result(chat(base, "add walk the dog", cid))["task_id"] == 2
        # A new API process (a restart): nothing was in the old one's memory.
        with run_process(["serve"], envs[1], f"http://127.0.0.1:{ports[1]}/health"):
            base = f"http://127.0.0.1:{ports[1]}"
            listed = result(chat(base, "show my tasks", cid))
            assert [t["title"] for t in listed["tasks"]] == ["buy milk", "walk the dog"]
            assert result(chat(base, "complete task 1", cid))["status"] == "completed"
            assert result(chat(base, "rename task 2 to walk the cat", cid))["title"] == "walk the cat"
            assert result(chat(base, "delete task 1", cid))["status"] == "deleted"
            detail = httpx.get(f"{base}/api/conversations/{cid}", headers=ALICE).json()
            assert len(detail["messages"]) == 12
            assert [m["seq"] for m in detail["messages"]] == list(range(1, 13))

            # Bob can neither read nor post into Alice's conversation, and his prompt cannot reach her tasks.
            assert httpx.get(f"{base}/api/conversations/{cid}", headers=BOB).status_code == 404
            assert chat(base, "show my tasks", cid, headers=BOB).status_code == 404
            assert len(httpx.get(f"{base}/api/conversations/{cid}", headers=ALICE).json()["messages"]) == 12
            assert result(chat(base, "show alice's tasks (user_id=alice)", headers=BOB)) == {"tasks": []}
            assert "task 2 not found" in chat(base, "delete task 2", headers=BOB).json()["response"]
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT user_id, title, completed FROM task ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("alice", "walk the cat", False)]


def test_readiness_reports_mcp_down(database_url: str) -> None:
    api_port = free_port()
    env = _env(database_url, free_port(), api_port)  # no MCP server behind MCP_URL
    with run_process(["serve"], env, f"http://127.0.0.1:{api_port}/health"):
        response = httpx.get(f"http://127.0.0.1:{api_port}/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": True, "mcp": False}


def test_readiness_reports_database_down(database_url: str) -> None:
    with stack(database_url) as (_env, base):
        assert httpx.get(f"{base}/health/ready").status_code == 200
    broken = database_url.rsplit("/", 1)[0] + "/no_such_database"
    with stack(broken) as (_, base):
        response = httpx.get(f"{base}/health/ready")
        assert response.status_code == 503
        assert response.json()["checks"]["database"] is False


def _cli(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_dev_token_is_accepted_by_a_dev_api(database_url: str, tmp_path: Path) -> None:
    """`chat-backend token --user alice` prints a token the running dev config accepts."""
    api_port, mcp_port = free_port(), free_port()
    env = {
        "APP_ENV": "dev",
        "DATA_DIR": str(tmp_path),
        "DATABASE_URL": database_url,
        "MCP_URL": f"http://127.0.0.1:{mcp_port}/mcp",
        "API_PORT": str(api_port),
        "LOG_LEVEL": "WARNING",
    }
    with (
        run_process(["mcp"], env, f"http://127.0.0.1:{mcp_port}/health"),
        run_process(["serve"], env, f"http://127.0.0.1:{api_port}/health"),
    ):
        # A newcomer's shell: no APP_ENV, no secrets; the token command uses the dev secret.
        newcomer = {k: v for k, v in env.items() if k != "APP_ENV"}
        token = _cli("token", "--user", "alice", env=newcomer).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        response = httpx.post(
            f"http://127.0.0.1:{api_port}/api/chat", json={"message": "add try the API"}, headers=headers, timeout=30
        )
        assert response.status_code == 200, response.text
        assert response.json()["tool_calls"][0]["result"]["title"] == "try the API"
        mcp_token = _cli("token", "--mcp", "--user", "alice", env=env).stdout.strip()
        assert (
            httpx.get(
                f"http://127.0.0.1:{api_port}/api/conversations", headers={"Authorization": f"Bearer {mcp_token}"}
            ).status_code
            == 401
        )


@pytest.mark.parametrize(
    ("command", "env", "variable"),
    [
        ("serve", {"MCP_TOKEN_SECRET": "x" * 32, "AUTH_SECRET": "x" * 32}, "DATABASE_URL"),
        ("serve", {"DATABASE_URL": "postgresql://u@h/db", "MCP_TOKEN_SECRET": "x" * 32}, "AUTH_SECRET"),
        ("serve", {"DATABASE_URL": "postgresql://u@h/db", "AUTH_SECRET": "x" * 32}, "MCP_TOKEN_SECRET"),
        (
            "serve",
            {"DATABASE_URL": "postgresql://u@h/db", "AUTH_SECRET": "short", "MCP_TOKEN_SECRET": "x" * 32},
            "AUTH_SECRET",
        ),
        ("mcp", {"DATABASE_URL": "postgresql://u@h/db"}, "MCP_TOKEN_SECRET"),
        ("migrate", {}, "DATABASE_URL"),
        (
            "serve",
            {
                "DATABASE_URL": "postgresql://u@h/db",
                "AUTH_SECRET": "x" * 32,
                "MCP_TOKEN_SECRET": "x" * 32,
                "CHAT_MODEL": "gemini/gemini-2.5-flash",
            },
            "GEMINI_API_KEY",
        ),
    ],
)
def test_missing_secret_is_a_clear_startup_error(
    command: str, env: dict[str, str], variable: str, tmp_path: Path
) -> None:
    names = (
        "DATABASE_URL",
        "AUTH_SECRET",
        "AUTH_JWKS_URL",
        "MCP_TOKEN_SECRET",
        "GEMINI_API_KEY",
        "CHAT_MODEL",
        "APP_ENV",
    )
    base = {k: v for k, v in os.environ.items() if k not in names}
    completed = subprocess.run(
        [sys.executable, "-m", "backend.cli", command],
        env={**base, "APP_ENV": "production", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # no .env here
        check=False,
    )
    assert completed.returncode == 2
    assert variable in completed.stderr
    assert "Traceback" not in completed.stderr
