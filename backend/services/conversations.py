"""Conversation queries. Every one is scoped by `user_id`: ownership is part of the WHERE clause."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from backend.errors import invalid
from backend.models import (
    Conversation,
    ConversationDetail,
    ConversationPage,
    ConversationSummary,
    Message,
    MessageOut,
)

PREVIEW_CHARS = 120


def get_owned(session: Session, conversation_id: uuid.UUID, user_id: str, *, lock: bool = False) -> Conversation | None:
    query = select(Conversation).where(Conversation.id == conversation_id, Conversation.user_id == user_id)
    if lock:
        query = query.with_for_update()
    return session.exec(query).first()


def encode_cursor(updated_at: datetime, conversation_id: uuid.UUID) -> str:
    raw = json.dumps({"u": updated_at.isoformat(), "i": str(conversation_id)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        return datetime.fromisoformat(data["u"]), uuid.UUID(data["i"])
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise invalid("query", "cursor", "cursor is not valid", "invalid_cursor") from exc


def _summary_query(user_id: str) -> sa.Select[tuple[Conversation, int, str | None]]:
    count = (
        select(sa.func.count()).select_from(Message).where(Message.conversation_id == Conversation.id).scalar_subquery()
    )
    preview = (
        select(sa.func.left(Message.content, PREVIEW_CHARS))
        .where(Message.conversation_id == Conversation.id, Message.content != "")
        .order_by(col(Message.seq).desc())
        .limit(1)
        .scalar_subquery()
    )
    return sa.select(Conversation, count, preview).where(col(Conversation.user_id) == user_id)


def _summary(row: Any) -> ConversationSummary:
    conv, count, preview = row
    return ConversationSummary(
        id=conv.id,
        title=conv.title,
        created_at=conv.created_at,
        updated_at=conv.updated_at,
        message_count=count,
        last_message_preview=preview,
    )


def list_conversations(session: Session, user_id: str, *, limit: int, cursor: str | None) -> ConversationPage:
    """Newest activity first; keyset pagination on (updated_at, id), served by the user index."""
    query = _summary_query(user_id)
    if cursor:
        updated_at, last_id = decode_cursor(cursor)
        query = query.where(sa.tuple_(Conversation.updated_at, Conversation.id) < sa.tuple_(updated_at, last_id))
    query = query.order_by(col(Conversation.updated_at).desc(), col(Conversation.id).desc()).limit(limit + 1)
    rows = session.execute(query).all()
    page = rows[:limit]
    last = page[-1][0] if page else None
    next_cursor = encode_cursor(last.updated_at, last.id) if last is not None and len(rows) > limit else None
    return ConversationPage(data=[_summary(row) for row in page], next_cursor=next_cursor)


def summary(session: Session, conversation: Conversation) -> ConversationSummary:
    row = session.execute(_summary_query(conversation.user_id).where(col(Conversation.id) == conversation.id)).one()
    return _summary(row)


def conversation_detail(
    session: Session, conversation: Conversation, *, limit: int, before: uuid.UUID | None
) -> ConversationDetail:
    """The newest `limit` messages (oldest first), or those just before message `before`."""
    query = select(Message).where(Message.conversation_id == conversation.id)
    if before is not None:
        anchor = session.exec(
            select(Message.seq).where(Message.conversation_id == conversation.id, Message.id == before)
        ).first()
        if anchor is None:
            raise invalid("query", "before", "before is not a message of this conversation", "invalid_before")
        query = query.where(Message.seq < anchor)
    rows = list(session.exec(query.order_by(col(Message.seq).desc()).limit(limit + 1)).all())
    has_more = len(rows) > limit
    page = list(reversed(rows[:limit]))
    return ConversationDetail(
        id=conversation.id,
        title=conversation.title,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        messages=[MessageOut.model_validate(m) for m in page],
        next_before=page[0].id if has_more and page else None,
    )


def rename(session: Session, conversation: Conversation, title: str) -> Conversation:
    # Renaming is not activity: updated_at (the list order) is left alone.
    conversation.title = title
    session.add(conversation)
    session.flush()
    return conversation


def delete(session: Session, conversation: Conversation) -> None:
    # Messages go with it (ON DELETE CASCADE).
    session.execute(sa.delete(Conversation).where(col(Conversation.id) == conversation.id))
