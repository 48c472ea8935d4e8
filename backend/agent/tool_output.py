"""Tool output as the agent loop hands it over: JSON when it is JSON (MCP structured content), else text."""

from __future__ import annotations

import json
from typing import Any


def parse_tool_output(output: Any) -> Any:
    if isinstance(output, str):
        try:
            parsed = json.loads(output)
        except ValueError:
            return output
        # MCP text content arrives as {"type": "text", "text": "..."}; unwrap it.
        if isinstance(parsed, dict) and parsed.get("type") == "text" and isinstance(parsed.get("text"), str):
            return parse_tool_output(parsed["text"])
        return parsed
    return output
