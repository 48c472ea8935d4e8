"""Node packages for tests that drive real npm clients: a tests/js/<name> project, installed once."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).parent.parent / "js"


def npm_project(name: str) -> Path:
    """tests/js/NAME with its locked packages installed (`npm ci` when node_modules is missing or
    differs from the lockfile; kept between runs). Skips only when node or npm is absent."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to run the npm clients")
    project = JS / name
    lock = json.loads((project / "package-lock.json").read_text())
    wanted = {
        path: entry["version"]
        for path, entry in lock["packages"].items()
        if path.startswith("node_modules/") and not entry.get("optional")
    }
    with open(project / "package.json") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one install at a time, should two test runs start together
        if not all(_installed(project / path) == version for path, version in wanted.items()):
            subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=project,
                check=True,
                timeout=600,
                capture_output=True,
            )
    return project


def _installed(package: Path) -> str | None:
    manifest = package / "package.json"
    return json.loads(manifest.read_text()).get("version") if manifest.exists() else None


def run_node(project: Path, script: str, *args: str, timeout: float = 120) -> object:
    """Run `node SCRIPT ARGS` in `project`; its stdout is one JSON document."""
    run = subprocess.run(["node", script, *args], cwd=project, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)
