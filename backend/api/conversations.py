"""Conversation listing, reading, renaming and deleting (the chat turn lives in `api/chat.py`)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from backend.deps import CurrentUser, OwnedConversation, SessionDep
from backend.errors import AUTH_ERRORS, error_responses
from backend.models import ConversationDetail, ConversationPage, ConversationRename, ConversationSummary
from backend.services import conversations as service

router = APIRouter(prefix="/api/conversations", tags=["conversations"], responses=error_responses(*AUTH_ERRORS))

NOT_FOUND = error_responses(404)


@router.get("")
def list_conversations(
    user_id: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> ConversationPage:
    return service.list_conversations(session, user_id, limit=limit, cursor=cursor)


@router.get("/{conversation_id}", responses=NOT_FOUND)
def read_conversation(
    conversation: OwnedConversation,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: uuid.UUID | None = None,
) -> ConversationDetail:
    return service.conversation_detail(session, conversation, limit=limit, before=before)


@router.patch("/{conversation_id}", responses=NOT_FOUND)
def rename_conversation(
    conversation: OwnedConversation, body: ConversationRename, session: SessionDep
) -> ConversationSummary:
    service.rename(session, conversation, body.title)
    return service.summary(session, conversation)


@router.delete("/{conversation_id}", status_code=204, responses=NOT_FOUND)
def delete_conversation(conversation: OwnedConversation, session: SessionDep) -> Response:
    service.delete(session, conversation)
    return Response(status_code=204)
