"""Conversation listing, reading, renaming and deleting (the chat turn lives in `api/chat.py`).

Each route is one unit of database work (`Database.run`), committed before the response is sent:
a GET after a 2xx PATCH or DELETE sees it.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from backend.deps import CurrentUser, DatabaseDep, OwnedConversation
from backend.errors import AUTH_ERRORS, error_responses
from backend.models import ConversationDetail, ConversationPage, ConversationRename, ConversationSummary
from backend.services import conversations as service

router = APIRouter(prefix="/api/conversations", tags=["conversations"], responses=error_responses(*AUTH_ERRORS))

NOT_FOUND = error_responses(404)


@router.get("")
async def list_conversations(
    user_id: CurrentUser,
    db: DatabaseDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> ConversationPage:
    rows, more = await db.run(lambda c: service.conversation_page(c, user_id, limit=limit, after=cursor, preview=True))
    return ConversationPage(
        data=[service.summary(row) for row in rows], next_cursor=service.cursor_after(rows) if more else None
    )


@router.get("/{conversation_id}", responses=NOT_FOUND)
async def read_conversation(
    conversation: OwnedConversation,
    db: DatabaseDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: uuid.UUID | None = None,
) -> ConversationDetail:
    """The newest `limit` messages (oldest first), or those just before message `before`."""
    rows, more = await db.run(
        lambda c: service.message_page(
            c, conversation.id, limit=limit, after=before, descending=True, field=("query", "before")
        )
    )
    page = [service.message_out(row) for row in reversed(rows)]
    return ConversationDetail(
        id=conversation.id,
        title=conversation.title,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        messages=page,
        next_before=page[0].id if more and page else None,
    )


@router.patch("/{conversation_id}", responses=NOT_FOUND)
async def rename_conversation(
    conversation: OwnedConversation, body: ConversationRename, user_id: CurrentUser, db: DatabaseDep
) -> ConversationSummary:
    return await db.run(lambda c: service.rename(c, conversation.id, user_id, body.title))


@router.delete("/{conversation_id}", status_code=204, responses={**NOT_FOUND, **error_responses(409)})
async def delete_conversation(conversation: OwnedConversation, user_id: CurrentUser, db: DatabaseDep) -> Response:
    """Deletes it with its messages; 409 while a reply is being generated in it."""
    await db.run(lambda c: service.delete(c, conversation.id, user_id))
    return Response(status_code=204)
