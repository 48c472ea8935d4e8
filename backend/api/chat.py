"""`POST /api/chat` (one JSON answer) and `POST /api/chat/stream` (Server-Sent Events).

Both run the same turn service; they differ only in how its events reach the client. The turn is
begun before the response starts, so 404/409/422/429 arrive as real HTTP statuses.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header

from backend.api.openapi import event_stream
from backend.api.sse import EventStream, frame
from backend.deps import CurrentUser, TurnsDep
from backend.errors import AUTH_ERRORS, error_responses
from backend.failures import InvalidInput
from backend.models import ChatRequest, ChatResponse, ClientMessageId, ToolCallOut, Usage
from backend.services.turn import TurnStream
from backend.services.turn_events import (
    Token,
    ToolCalled,
    ToolReturned,
    TurnCompleted,
    TurnError,
    TurnEvent,
    TurnStarted,
)
from backend.services.turn_store import TurnRequest

router = APIRouter(prefix="/api/chat", tags=["chat"], responses=error_responses(*AUTH_ERRORS))

ERRORS = error_responses(404, 409, 429, 502, 503, 504)

# The IETF httpapi draft's name for an idempotency key, accepted beside `client_message_id`.
IdempotencyKey = Annotated[
    ClientMessageId | None,
    Header(alias="Idempotency-Key", description="An alias for `client_message_id` (IETF httpapi draft)"),
]


def turn_request(body: ChatRequest, user_id: str, header_key: str | None) -> TurnRequest:
    key = body.client_message_id
    if header_key is not None and key is not None and header_key != key:
        raise InvalidInput("Idempotency-Key and client_message_id differ", field=("header", "Idempotency-Key"))
    return TurnRequest(user_id, body.message, body.conversation_id, key or header_key)


@router.post("", responses=ERRORS)
async def chat(body: ChatRequest, user_id: CurrentUser, turns: TurnsDep, key: IdempotencyKey = None) -> ChatResponse:
    turn = await turns.begin(turn_request(body, user_id, key))
    done = await turns.run(turn)
    return ChatResponse(
        conversation_id=done.conversation_id,
        message_id=done.message_id,
        response=done.content,
        tool_calls=[ToolCallOut(**call) for call in done.tool_calls],
        usage=Usage(**done.usage),
        model=done.model,
        duration_ms=done.duration_ms,
    )


@router.post(
    "/stream",
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": event_stream("ChatStreamEvent", "Turn events, to `complete` or `error`.")},
            "description": "SSE turn events",
        },
    },
    response_class=EventStream,
)
async def chat_stream(
    body: ChatRequest, user_id: CurrentUser, turns: TurnsDep, key: IdempotencyKey = None
) -> EventStream:
    stream = turns.stream(await turns.begin(turn_request(body, user_id, key)))
    return EventStream(_sse(stream), send_timeout=turns.settings.sse_send_timeout_seconds, on_close=stream.aclose)


HEARTBEAT = frame('{"type":"heartbeat"}')


async def _sse(stream: TurnStream) -> AsyncIterator[bytes]:
    async for event in stream:
        if event is None:
            # A JSON event, not an SSE comment: some client libraries hand comments to `onmessage`.
            yield HEARTBEAT
        elif isinstance(event, Token):  # the hot path: one per token
            yield frame(f'{{"type":"token","token":{json.dumps(event.token)},"index":{event.index}}}')
        else:
            yield frame(json.dumps(event_body(event), default=str))


def event_body(event: TurnEvent) -> dict[str, Any]:
    match event:
        case TurnStarted():
            return {"type": "start", "conversation_id": event.conversation_id, "message_id": event.message_id}
        case Token():
            return {"type": "token", "token": event.token, "index": event.index}
        case ToolCalled():
            return {"type": "tool_call", "call_id": event.call_id, "name": event.name, "arguments": event.arguments}
        case ToolReturned():
            return {"type": "tool_result", "call_id": event.call_id, "name": event.name, "result": event.result}
        case TurnCompleted():
            return {
                "type": "complete",
                "conversation_id": event.conversation_id,
                "message_id": event.message_id,
                "full_content": event.content,
                "tool_calls": event.tool_calls,
                "usage": event.usage,
                "model": event.model,
                "duration_ms": event.duration_ms,
            }
        case TurnError():
            error = event.error
            return {"type": "error", "code": error.code, "message": error.message, "retryable": error.retryable}
