"""What a running turn tells its front door, in order: start, tokens, tool calls and results, then
exactly one `TurnCompleted` or `TurnError`.

Ids stay UUIDs until a front door serialises them. `TurnError` carries the one failure type
(`ServiceError`); each front door renders it its own way (an HTTP status, an SSE `error` event, a
ChatKit error event).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from backend.failures import ServiceError


def zero_usage() -> dict[str, int]:
    return {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}


@dataclass(frozen=True, slots=True)
class TurnStarted:
    conversation_id: uuid.UUID
    message_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Token:
    token: str
    index: int


@dataclass(frozen=True, slots=True)
class ToolCalled:
    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolReturned:
    call_id: str
    name: str
    result: Any


@dataclass(frozen=True, slots=True)
class TurnCompleted:
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    content: str
    tool_calls: list[dict[str, Any]]
    usage: dict[str, int] = field(default_factory=zero_usage)
    model: str = ""
    duration_ms: int = 0


@dataclass(frozen=True, slots=True)
class TurnError:
    error: ServiceError
    conversation_id: uuid.UUID
    message_id: uuid.UUID


TurnEvent = TurnStarted | Token | ToolCalled | ToolReturned | TurnCompleted | TurnError
