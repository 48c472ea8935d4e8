"""Logging for a process, configured once by its entry point (`serve`, each of its workers, `mcp`).

Not inside `create_app`: building an app must not change process-wide state. One handler on the
root logger, to stderr; uvicorn's loggers propagate to it (its own handlers are not installed, see
backend/server.py), so its lines get the same shape. Every line carries the request id of the
request it was written for (`-` outside one), from `REQUEST_ID`.

`LOG_FORMAT=text` (default) is one readable line; `LOG_FORMAT=json` one JSON object per line with
`timestamp`, `level`, `logger`, `message`, `request_id` and whatever `extra` fields the call gave (the
per-turn line: conversation_id, message_id, user_id, model, outcome, duration_ms, input_tokens,
output_tokens, tool_count, error_code).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from backend.config import Settings
from backend.request_context import current_request_id

# What every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# Libraries that log one line per HTTP request or model call at INFO would drown the line per turn.
_NOISY = ("httpx", "httpx2", "LiteLLM")


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (on the handler, so library loggers get it too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """Replace the root logger's handlers with ours (idempotent: a second call changes nothing more)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = logging.getLevelName(settings.log_level)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # Through the root handler, in the same format; uvicorn installs none (log_config=None).
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level))
