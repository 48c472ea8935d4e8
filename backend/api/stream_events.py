"""The JSON of each `POST /api/chat/stream` event, as the OpenAPI document publishes it.

`api/chat.py` writes the events by hand (the token event is the hot path); these models are what a
typed client reads, and tests/test_openapi.py checks that every event it writes fits them exactly.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.models import ToolCallOut, Usage


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatStart(_Event):
    """First event: the assistant message being written."""

    type: Literal["start"]
    conversation_id: uuid.UUID
    message_id: uuid.UUID


class ChatToken(_Event):
    type: Literal["token"]
    token: str
    index: int


class ChatToolCall(_Event):
    type: Literal["tool_call"]
    call_id: str
    name: str
    arguments: dict[str, Any]


class ChatToolResult(_Event):
    type: Literal["tool_result"]
    call_id: str
    name: str
    result: Any


class ChatComplete(_Event):
    """Last event of a turn that finished: the reply as stored."""

    type: Literal["complete"]
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    full_content: str
    tool_calls: list[ToolCallOut]
    usage: Usage
    model: str
    duration_ms: int


class ChatError(_Event):
    """Last event of a turn that failed (stored as an error reply)."""

    type: Literal["error"]
    code: str
    message: str
    retryable: bool


class ChatHeartbeat(_Event):
    """Sent while the model is silent so proxies keep the connection; ignore it."""

    type: Literal["heartbeat"]


ChatStreamEvent = Annotated[
    ChatStart | ChatToken | ChatToolCall | ChatToolResult | ChatComplete | ChatError | ChatHeartbeat,
    Field(discriminator="type"),
]
