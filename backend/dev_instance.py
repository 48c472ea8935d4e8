"""The running `chat-backend dev`: a lock in DATA_DIR and a per-user record of where it runs.

The lock (`DATA_DIR/dev.lock`, held with `flock`, released by the OS whenever the process ends, even
on SIGKILL) makes a second `dev` on the same data refuse, naming the first, instead of sharing and
then stopping the first one's embedded PostgreSQL. The record (one small JSON file per running
`dev` under `$XDG_STATE_HOME/chat-backend/running/`, no secrets in it) lets `chat-backend token`
run from another directory find that instance's DATA_DIR and `.env`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "dev.lock"


class DevAlreadyRunning(RuntimeError):
    """Another `chat-backend dev` holds this DATA_DIR; the message names it."""


@dataclass(frozen=True)
class DevInstance:
    pid: int
    cwd: str
    data_dir: str
    api_url: str
    mcp_url: str

    def describe(self) -> str:
        return f"pid {self.pid}, API {self.api_url}, MCP {self.mcp_url}, data in {self.data_dir}"


def records_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "chat-backend" / "running"


@contextmanager
def claim(instance: DevInstance) -> Iterator[None]:
    """Hold DATA_DIR's lock and publish `instance` for the duration; refuse if another `dev` holds it."""
    data_dir = Path(instance.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = _read(data_dir / LOCK_NAME)
        who = f" ({other.describe()})" if other else ""
        raise DevAlreadyRunning(
            f"another `chat-backend dev` is already running on this data directory{who}. "
            "Use that one, stop it first (Ctrl-C in its terminal), or give this one its own "
            "DATA_DIR, API_PORT and MCP_URL."
        ) from None
    record = records_dir() / f"dev-{instance.pid}.json"
    try:
        text = json.dumps(asdict(instance))
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        with suppress(OSError):  # a read-only home only costs `token` its fallback
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(text)
        yield
    finally:
        record.unlink(missing_ok=True)
        with suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def running_instances() -> list[DevInstance]:
    """The `dev` instances that are running now (by their locks); records of dead ones are removed."""
    found: list[DevInstance] = []
    folder = records_dir()
    for path in sorted(folder.glob("dev-*.json")) if folder.is_dir() else []:
        instance = _read(path)
        if instance is not None and _is_locked(Path(instance.data_dir) / LOCK_NAME):
            found.append(instance)
        else:
            path.unlink(missing_ok=True)
    return found


def _is_locked(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _read(path: Path) -> DevInstance | None:
    try:
        return DevInstance(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
