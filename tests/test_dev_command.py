"""The README's first command, as a newcomer runs it: `chat-backend dev` with nothing configured.

No DATABASE_URL, no secrets, no key: it must start the embedded PostgreSQL, migrate, serve the MCP
server and the API with the offline model, accept a token from `chat-backend token` (also from
another directory), refuse a second `dev` on the same checkout without harming the first, run the
README's walkthrough as written, and stop all of it, PostgreSQL included, on every way out: Ctrl-C,
SIGTERM in the middle of start-up, a child process that dies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.servers import free_port, wait_http

CONFIG_VARS = ("DATABASE_URL", "AUTH_SECRET", "AUTH_JWKS_URL", "MCP_TOKEN_SECRET", "GEMINI_API_KEY", "CHAT_MODEL")
CLI = [sys.executable, "-m", "backend.cli"]
README = Path(__file__).resolve().parent.parent / "README.md"


def _newcomer_env(tmp_path: Path) -> tuple[dict[str, str], int]:
    """A shell with nothing configured (own ports; the per-user state folder inside tmp_path)."""
    api_port, mcp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in (*CONFIG_VARS, "APP_ENV", "DATA_DIR", "WEB_CONCURRENCY")}
    env |= {
        "API_PORT": str(api_port),
        "MCP_URL": f"http://127.0.0.1:{mcp_port}/mcp",
        "LOG_LEVEL": "WARNING",
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }
    return env, api_port


def _start_dev(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen([*CLI, "dev"], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _assert_all_stopped(checkout: Path, tmp_path: Path) -> None:
    pgdata = checkout / ".data" / "pg"
    assert (pgdata / "PG_VERSION").exists()  # data kept for the next start ...
    assert not (pgdata / "postmaster.pid").exists()  # ... and the server stopped
    assert list((tmp_path / "state" / "chat-backend" / "running").glob("*")) == []  # no record left


def _readme_walkthrough(api_port: int) -> str:
    """The bash block of the README's "The first minute", pointed at this test's port and CLI."""
    section = README.read_text().split("## The first minute", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return block.replace("localhost:8000", f"127.0.0.1:{api_port}").replace(".venv/bin/chat-backend", " ".join(CLI))


def test_dev_starts_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    env, api_port = _newcomer_env(tmp_path)
    api = f"http://127.0.0.1:{api_port}"
    checkout, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    elsewhere.mkdir()
    dev = _start_dev(env, checkout)
    try:
        wait_http(f"{api}/health/ready", timeout=180, proc=dev)
        ready = httpx.get(f"{api}/health/ready").json()
        assert ready["checks"] == {"database": True, "mcp": True}

        # The README's walkthrough, as written.
        walk = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", _readme_walkthrough(api_port)],
            env=env,
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert walk.returncode == 0, walk.stderr
        replies = [json.loads(line) for line in walk.stdout.splitlines() if line.startswith("{")]
        added, listed = replies[0], replies[1]
        assert added["tool_calls"][0]["result"]["title"] == "buy milk"
        assert listed["conversation_id"] == added["conversation_id"]  # CID carried the conversation on
        assert [t["title"] for t in listed["tool_calls"][0]["result"]["tasks"]] == ["buy milk"]
        assert '"type":"complete"' in walk.stdout.replace(" ", "")

        # A second `dev` in the same checkout refuses, names the first, and leaves it working.
        second = subprocess.run([*CLI, "dev"], env=env, cwd=checkout, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"pid {dev.pid}" in second.stderr and api in second.stderr
        assert "Traceback" not in second.stderr
        assert httpx.get(f"{api}/health/ready").json()["checks"] == {"database": True, "mcp": True}

        # `token` from another directory signs with the running dev's secrets.
        token = subprocess.run(
            [*CLI, "token", "--user", "bob"], env=env, cwd=elsewhere, capture_output=True, text=True, check=True
        )
        assert f"pid {dev.pid}" in token.stderr
        headers = {"Authorization": f"Bearer {token.stdout.strip()}"}
        reply = httpx.post(f"{api}/api/chat", json={"message": "add call mom"}, headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "offline"
        assert reply.json()["tool_calls"][0]["result"]["title"] == "call mom"
        assert not (elsewhere / ".data").exists()
    finally:
        dev.send_signal(signal.SIGINT)
        output, _ = dev.communicate(timeout=60)
    text = output.decode()
    assert dev.returncode == 0, text
    assert "embedded PostgreSQL" in text and "token --user alice" in text and "Stopped." in text
    assert "Traceback" not in text
    _assert_all_stopped(checkout, tmp_path)
    assert (checkout / ".data" / "dev-secrets.json").stat().st_mode & 0o077 == 0  # readable by its owner only


def test_sigterm_during_start_up_stops_postgres(tmp_path: Path) -> None:
    env, _ = _newcomer_env(tmp_path)
    checkout = tmp_path / "checkout"
    dev = _start_dev(env, checkout)
    assert dev.stdout is not None
    seen = b""
    while b"Running migrations" not in seen:  # PostgreSQL is up by then
        line = dev.stdout.readline()
        assert line, f"dev ended early: {seen.decode()}"
        seen += line
    dev.send_signal(signal.SIGTERM)
    output, _ = dev.communicate(timeout=60)
    text = seen.decode() + output.decode()
    assert dev.returncode == 0, text
    assert "Stopped." in text and "Traceback" not in text
    _assert_all_stopped(checkout, tmp_path)


def _children(pid: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue
            if ppid == pid:
                found[int(entry.name)] = cmdline
    return found


def test_a_dying_child_stops_everything(tmp_path: Path) -> None:
    env, api_port = _newcomer_env(tmp_path)
    checkout = tmp_path / "checkout"
    dev = _start_dev(env, checkout)
    try:
        wait_http(f"http://127.0.0.1:{api_port}/health", timeout=180, proc=dev)
        children = _children(dev.pid)
        (serve,) = [pid for pid, cmd in children.items() if re.search(r"backend\.cli serve", cmd)]
        (mcp,) = [pid for pid, cmd in children.items() if re.search(r"backend\.cli mcp", cmd)]
        os.kill(serve, signal.SIGKILL)
        output, _ = dev.communicate(timeout=60)
    finally:
        if dev.poll() is None:
            dev.kill()
    text = output.decode()
    assert dev.returncode == 1, text
    assert "A child process exited" in text and "Stopped." in text and "Traceback" not in text
    _assert_all_stopped(checkout, tmp_path)
    assert not Path(f"/proc/{mcp}").exists()  # the other child was stopped (and reaped) too
