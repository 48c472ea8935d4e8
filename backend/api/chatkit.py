"""`POST /chatkit`: the ChatKit server protocol over the conversation and message tables.

JWT-guarded like every /api route. Streaming requests (threads.create, threads.add_user_message,
threads.retry_after_item) answer Server-Sent Events; the others answer one JSON body. Errors that can
be known before a stream starts are real HTTP statuses with our `{"detail", "code"}` body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from chatkit.server import StreamingResult
from chatkit.store import NotFoundError
from chatkit.types import ErrorEvent
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from backend.deps import CurrentUser, TurnDepsDep
from backend.errors import AUTH_ERRORS, ApiError, error_responses, not_found
from backend.services.chatkit_server import TaskChatKitServer
from backend.services.chatkit_store import ChatKitContext
from backend.services.streaming import SSE_HEADERS, with_heartbeats

log = logging.getLogger(__name__)

router = APIRouter(tags=["chatkit"])

# Stateless: who is asking and the turn plumbing travel in the per-request context.
server = TaskChatKitServer()

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/json": {}, "text/event-stream": {}},
        "description": "A JSON body, or ChatKit thread events as SSE for streaming requests",
    },
    **error_responses(*AUTH_ERRORS, 404, 409),
}


@router.post(
    "/chatkit",
    responses=RESPONSES,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}},
)
async def chatkit(request: Request, user_id: CurrentUser, deps: TurnDepsDep) -> Response:
    context = ChatKitContext(user_id=user_id, deps=deps)
    try:
        result = await server.handle(await request.body(), context)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    except NotFoundError as exc:
        raise not_found() from exc  # the same body as /api for a missing or someone else's conversation
    if isinstance(result, StreamingResult):
        return StreamingResponse(
            _sse(result, deps.settings.sse_heartbeat_seconds), media_type="text/event-stream", headers=SSE_HEADERS
        )
    return Response(result.json, media_type="application/json")


def _error_line(message: str, retryable: bool) -> bytes:
    event = ErrorEvent(message=message, allow_retry=retryable)
    return b"data: " + event.model_dump_json(exclude_none=True).encode() + b"\n\n"


async def _sse(result: StreamingResult, heartbeat: float) -> AsyncIterator[bytes]:
    # The whole ChatKit pipeline runs in a task of its own, with comment heartbeats meanwhile; when
    # the client goes away that task is cancelled, and the turn stores its partial answer as aborted.
    try:
        async for chunk in with_heartbeats(lambda: result.json_events, heartbeat):
            yield b": heartbeat\n\n" if chunk is None else chunk
    except NotFoundError:  # e.g. the thread was deleted between our checks and the stream
        yield _error_line(str(not_found()), False)
    except ApiError as exc:  # e.g. a retry while another turn runs (409)
        yield _error_line(str(exc), bool(exc.retryable))
    except Exception:
        log.exception("ChatKit stream failed")
        yield _error_line("The request could not be completed", True)
