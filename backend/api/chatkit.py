"""`POST /chatkit`: the ChatKit server protocol over the conversation and message tables.

JWT-guarded like every /api route. Streaming requests (threads.create, threads.add_user_message,
threads.retry_after_item) answer Server-Sent Events; the others answer one JSON body. Errors that can
be known before a stream starts are real HTTP statuses with our `{"detail", "code"}` body; later
ones are ChatKit `error` events.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from chatkit.server import StreamingResult
from chatkit.store import NotFoundError
from chatkit.types import ErrorEvent
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from backend.api.openapi import event_stream, schema_ref
from backend.api.sse import EventStream
from backend.deps import CurrentUser, TurnsDep
from backend.errors import AUTH_ERRORS, error_responses
from backend.failures import NotFound, ServiceError
from backend.services.chatkit_server import TaskChatKitServer, error_event
from backend.services.chatkit_store import ChatKitContext
from backend.services.streaming import with_heartbeats

log = logging.getLogger(__name__)

router = APIRouter(tags=["chatkit"])

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "application/json": {},
            "text/event-stream": event_stream("ChatKitEvent", "ChatKit thread events (comment heartbeats between)."),
        },
        "description": "A JSON body, or ChatKit thread events as SSE for streaming requests",
    },
    **error_responses(*AUTH_ERRORS, 404, 409),
}


async def get_chatkit(request: Request) -> TaskChatKitServer:
    server: TaskChatKitServer = request.app.state.chatkit
    return server


ChatKitDep = Annotated[TaskChatKitServer, Depends(get_chatkit)]


@router.post(
    "/chatkit",
    responses=RESPONSES,
    # ChatKit's own parser reads the raw body; the document still says what it accepts.
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema_ref("ChatKitRequest")}}}
    },
)
async def chatkit(request: Request, user_id: CurrentUser, server: ChatKitDep, turns: TurnsDep) -> Response:
    context = ChatKitContext(user_id=user_id)
    try:
        result = await server.handle(await request.body(), context)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    except NotFoundError as exc:
        raise NotFound() from exc  # the same body as /api for a missing or someone else's conversation

    async def close() -> None:
        # Whatever this request began ends with the response: stored, or stored as aborted.
        if context.stream is not None:
            await context.stream.aclose()
        elif context.turn is not None:
            await turns.abandon(context.turn)

    if isinstance(result, StreamingResult):
        heartbeat, send_timeout = turns.settings.sse_heartbeat_seconds, turns.settings.sse_send_timeout_seconds
        return EventStream(_sse(result, heartbeat), send_timeout=send_timeout, on_close=close)
    return Response(result.json, media_type="application/json")


def _line(event: ErrorEvent) -> bytes:
    return b"data: " + event.model_dump_json(exclude_none=True).encode() + b"\n\n"


async def _sse(result: StreamingResult, heartbeat: float) -> AsyncIterator[bytes]:
    # ChatKit's client reads a standard SSE parser: comment heartbeats keep idle proxies open.
    try:
        async for chunk in with_heartbeats(result.json_events, heartbeat):
            yield b": heartbeat\n\n" if chunk is None else chunk
    except NotFoundError:  # e.g. the thread was deleted between our checks and the stream
        yield _line(error_event(NotFound()))
    except ServiceError as error:  # a turn refused as it began (busy, limits): nothing was announced
        yield _line(error_event(error))
    except Exception:
        log.exception("ChatKit stream failed")
        yield _line(ErrorEvent(message="The request could not be completed", allow_retry=True))
