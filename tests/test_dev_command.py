"""The README's first command, as a newcomer runs it: `chat-backend dev` with nothing configured.

No DATABASE_URL, no secrets, no key: it must start the embedded PostgreSQL, migrate, serve the MCP
server and the API with the offline model, accept a token from `chat-backend token`, and stop all
of it, PostgreSQL included, on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.servers import free_port, wait_http

CONFIG_VARS = ("DATABASE_URL", "AUTH_SECRET", "AUTH_JWKS_URL", "MCP_TOKEN_SECRET", "GEMINI_API_KEY", "CHAT_MODEL")


def test_dev_starts_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    api_port, mcp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS and k != "APP_ENV"}
    env |= {
        "DATA_DIR": str(tmp_path / ".data"),
        "API_PORT": str(api_port),
        "MCP_URL": f"http://127.0.0.1:{mcp_port}/mcp",
        "LOG_LEVEL": "WARNING",
    }
    cli = [sys.executable, "-m", "backend.cli"]
    dev = subprocess.Popen([*cli, "dev"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{api_port}/health/ready", timeout=180, proc=dev)
        ready = httpx.get(f"http://127.0.0.1:{api_port}/health/ready").json()
        assert ready["checks"] == {"database": True, "mcp": True}

        token = subprocess.run(
            [*cli, "token", "--user", "alice"], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        reply = httpx.post(
            f"http://127.0.0.1:{api_port}/api/chat", json={"message": "add buy milk"}, headers=headers, timeout=30
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "offline"
        assert reply.json()["tool_calls"][0]["result"]["title"] == "buy milk"
        listing = httpx.get(f"http://127.0.0.1:{api_port}/api/conversations", headers=headers).json()
        assert len(listing["data"]) == 1
    finally:
        dev.send_signal(signal.SIGINT)
        output, _ = dev.communicate(timeout=60)
    text = output.decode()
    assert dev.returncode == 0, text
    assert "embedded PostgreSQL" in text and "token --user alice" in text and "Stopped." in text
    assert "Traceback" not in text
    pgdata = tmp_path / ".data" / "pg"
    assert (pgdata / "PG_VERSION").exists()  # data kept for the next start ...
    assert not (pgdata / "postmaster.pid").exists()  # ... and the server stopped
    assert (tmp_path / ".data" / "dev-secrets.json").stat().st_mode & 0o077 == 0  # readable by its owner only
