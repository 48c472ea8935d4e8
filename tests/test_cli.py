"""`chat-backend` as a newcomer meets it: one-line errors, helpful `--help`, tokens that work, one `dev`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from backend.cli import COMMANDS, main
from backend.config import Settings, usable_cpus
from backend.dev_instance import DevAlreadyRunning, DevInstance, claim, running_instances

CONFIG_VARS = ("DATABASE_URL", "AUTH_SECRET", "AUTH_JWKS_URL", "MCP_TOKEN_SECRET", "GEMINI_API_KEY", "CHAT_MODEL")
GOOD = {
    "APP_ENV": "production",
    "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
    "AUTH_SECRET": "x" * 32,
    "MCP_TOKEN_SECRET": "y" * 32,
}


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in (*CONFIG_VARS, "APP_ENV", "DATA_DIR", "LOG_LEVEL")}
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,  # no .env here
        check=False,
    )


def _one_line_error(done: subprocess.CompletedProcess[str], variable: str) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert variable in lines[0]
    return lines[0]


BAD_SETTINGS = [
    ("LOG_LEVEL", "verbose"),
    ("DATABASE_URL", "not a url"),
    ("DATABASE_URL", "mysql://root:hunter2@db/app"),
    ("DATABASE_URL", "postgresql://u:hunter2@db:port/app"),
    ("DB_POOL_SIZE", "ten"),
    ("WEB_CONCURRENCY", "0"),
]


@pytest.mark.parametrize("command", ["serve", "mcp", "migrate", "dev", "token --user a"])
@pytest.mark.parametrize(("variable", "value"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_it(
    command: str,
    variable: str,
    value: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    for name in (*CONFIG_VARS, "DATA_DIR", "LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    for name, setting in {**GOOD, variable: value}.items():
        monkeypatch.setenv(name, setting)
    assert main(command.split()) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and variable in error, error
    assert "hunter2" not in error  # a URL's password is never echoed


@pytest.mark.parametrize("command", ["serve", "dev"])
def test_a_bad_setting_in_a_real_process_has_no_traceback(command: str, tmp_path: Path) -> None:
    done = _cli(command, env={**GOOD, "LOG_LEVEL": "verbose"}, cwd=tmp_path)
    assert _one_line_error(done, "LOG_LEVEL") == (
        f"chat-backend {command}: configuration error: LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING', "
        "'ERROR' or 'CRITICAL' (got 'VERBOSE')"
    )


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    done = _cli("migrate", env=GOOD, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "DATABASE_URL" in done.stderr and "port 1" in done.stderr
    assert "Traceback" not in done.stderr


def test_log_level_is_case_insensitive() -> None:
    assert Settings(_env_file=None, log_level="warning").log_level == "WARNING"  # type: ignore[call-arg]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_help_says_what_it_does(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    description = " ".join(COMMANDS[command][1].split())
    assert description in text
    assert len(description) > 150  # a paragraph, not the one-line summary


def test_workers_default_to_the_cpus_capped_at_8(capsys: pytest.CaptureFixture[str]) -> None:
    assert Settings(_env_file=None).workers == min(usable_cpus(), 8)  # type: ignore[call-arg]
    assert Settings(_env_file=None, web_concurrency=3).workers == 3  # type: ignore[call-arg]
    with pytest.raises(SystemExit):
        main(["serve", "--workers", "0"])
    assert "--workers" in capsys.readouterr().err


def test_token_outside_a_checkout_says_where_it_looked(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = _cli("token", "--user", "alice", env={"XDG_STATE_HOME": str(state)}, cwd=tmp_path)
    line = _one_line_error(done, "DATA_DIR")
    assert str(tmp_path / ".data" / "dev-secrets.json") in line
    assert str(state / "chat-backend" / "running") in line
    assert done.stdout == ""
    assert not (tmp_path / ".data").exists()  # it made up no secrets of its own


def test_a_second_claim_on_the_same_data_refuses_naming_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    first = DevInstance(111, str(tmp_path), str(tmp_path / ".data"), "http://127.0.0.1:8000", "http://x:8001/mcp")
    with claim(first):
        assert running_instances() == [first]
        second = DevInstance(222, str(tmp_path), str(tmp_path / ".data"), "http://127.0.0.1:8002", "http://x/mcp")
        with pytest.raises(DevAlreadyRunning) as refused, claim(second):
            pass
        assert "pid 111" in str(refused.value) and "http://127.0.0.1:8000" in str(refused.value)
    assert running_instances() == []
    with claim(second):  # released on exit
        assert running_instances() == [second]


def test_records_of_dead_instances_are_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    folder = tmp_path / "state" / "chat-backend" / "running"
    folder.mkdir(parents=True)
    dead = DevInstance(333, str(tmp_path), str(tmp_path / "gone"), "http://127.0.0.1:1", "http://127.0.0.1:2/mcp")
    (folder / "dev-333.json").write_text(json.dumps(asdict(dead)))
    assert running_instances() == []
    assert not (folder / "dev-333.json").exists()


def test_an_operator_token_over_an_hour_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MCP_TOKEN_SECRET", "y" * 32)
    assert main(["token", "--mcp", "--user", "alice", "--ttl", "7200"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--ttl" in error and "3600" in error, error
