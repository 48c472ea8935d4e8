"""Architecture rules a syntax tree can keep true: the API never touches the task tables."""

from __future__ import annotations

import ast
from pathlib import Path

BACKEND = Path(__file__).resolve().parents[1] / "backend"
# The MCP server owns the task tables; models.py declares them; cli.py starts the MCP process.
MCP_TABLES = {"Task", "TaskCounter", "ToolCall"}
ALLOWED = {BACKEND / "mcp_server", BACKEND / "models.py", BACKEND / "cli.py"}


def _api_modules() -> list[Path]:
    return [p for p in BACKEND.rglob("*.py") if not any(p == a or a in p.parents for a in ALLOWED)]


def test_only_the_mcp_server_uses_the_task_tables() -> None:
    offenders = []
    for path in _api_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.module == "backend.models":
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name in MCP_TABLES]
            if (node.module or "").startswith("backend.mcp_server"):
                offenders.append(f"{path.name}: imports {node.module}")
    assert offenders == []
    assert len(_api_modules()) > 15  # the rule is looking at the API's code
