"""`POST /api/chat/ui`: the chat turn for the Vercel AI SDK (`useChat` with `DefaultChatTransport`).

The same turn service as `/api/chat/stream`; ui_stream.py holds the protocol. As there, the turn is
begun before the response starts, so 401/404/409/422/429 are real HTTP statuses with our JSON body.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from backend.api.sse import EventStream
from backend.api.ui_stream import HEADERS, UIChatRequest, turn_request, ui_message_stream
from backend.deps import CurrentUser, TurnsDep
from backend.errors import AUTH_ERRORS, error_responses

router = APIRouter(prefix="/api/chat", tags=["chat"], responses=error_responses(*AUTH_ERRORS))

RESPONSES: dict[int | str, dict[str, Any]] = {
    **error_responses(404, 409, 429, 502, 503, 504),
    200: {
        "content": {"text/event-stream": {}},
        "description": "The AI SDK UI message stream (`x-vercel-ai-ui-message-stream: v1`)",
    },
}


@router.post("/ui", responses=RESPONSES, response_class=EventStream)
async def chat_ui(body: UIChatRequest, user_id: CurrentUser, turns: TurnsDep) -> EventStream:
    stream = turns.stream(await turns.begin(turn_request(body, user_id)))
    return EventStream(
        ui_message_stream(stream),
        send_timeout=turns.settings.sse_send_timeout_seconds,
        on_close=stream.aclose,
        headers=HEADERS,
    )
