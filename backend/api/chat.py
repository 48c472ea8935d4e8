"""`POST /api/chat` (one JSON answer) and `POST /api/chat/stream` (Server-Sent Events).

Both run the same turn service; they differ only in how its events reach the client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from backend.deps import CurrentUser, TurnDepsDep
from backend.errors import AUTH_ERRORS, ApiError, error_responses
from backend.models import ChatRequest, ChatResponse, ToolCallOut, Usage
from backend.services.streaming import SSE_HEADERS, with_heartbeats
from backend.services.turn import CompleteEvent, ErrorEvent, TurnEvent, TurnInput, begin, event_dict, run_turn

router = APIRouter(prefix="/api/chat", tags=["chat"], responses=error_responses(*AUTH_ERRORS))

ERRORS = error_responses(404, 409, 502, 503, 504)


def _input(body: ChatRequest, user_id: str) -> TurnInput:
    return TurnInput(user_id, body.message, body.conversation_id, body.client_message_id)


@router.post("", responses=ERRORS)
async def chat(body: ChatRequest, user_id: CurrentUser, deps: TurnDepsDep) -> ChatResponse:
    turn = await begin(deps, _input(body, user_id))
    async for event in run_turn(deps, user_id, turn):
        if isinstance(event, CompleteEvent):
            return ChatResponse(
                conversation_id=turn.conversation_id,
                message_id=event.message_id,  # type: ignore[arg-type]
                response=event.full_content,
                tool_calls=[ToolCallOut(**call) for call in event.tool_calls],
                usage=Usage(**event.usage),
                model=event.model,
                duration_ms=event.duration_ms,
            )
        if isinstance(event, ErrorEvent):
            raise ApiError(
                event.status_code,
                event.code,
                event.message,
                retryable=event.retryable,
                extra={"conversation_id": event.conversation_id, "message_id": event.message_id},
            )
    raise RuntimeError("the turn ended without a result")  # pragma: no cover


@router.post(
    "/stream",
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "SSE turn events"}},
    response_class=StreamingResponse,
)
async def chat_stream(body: ChatRequest, user_id: CurrentUser, deps: TurnDepsDep) -> StreamingResponse:
    # Begin before the response starts, so 404/409 arrive as real HTTP statuses.
    turn = await begin(deps, _input(body, user_id))
    return StreamingResponse(
        _sse(lambda: run_turn(deps, user_id, turn), deps.settings.sse_heartbeat_seconds),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _sse(events: Callable[[], AsyncIterator[TurnEvent]], heartbeat: float) -> AsyncIterator[str]:
    async for event in with_heartbeats(events, heartbeat):
        if event is None:
            yield ": heartbeat\n\n"
        else:
            yield f"data: {json.dumps(event_dict(event), default=str)}\n\n"
