"""Rows for tests that need existing conversations (the chat turn has its own tests)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text
from sqlmodel import Session

from backend.models import Conversation, Message


def conversation(
    engine: Engine, user_id: str, *, title: str = "Chat", messages: int = 0, age_minutes: int = 0
) -> uuid.UUID:
    updated = datetime.now(UTC) - timedelta(minutes=age_minutes)
    with Session(engine) as session:
        conv = Conversation(
            user_id=user_id,
            title=title,
            created_at=updated,
            updated_at=updated,
            last_seq=messages,
            message_count=messages,
        )
        session.add(conv)
        session.flush()
        for seq in range(1, messages + 1):
            role = "user" if seq % 2 else "assistant"
            session.add(
                Message(conversation_id=conv.id, user_id=user_id, seq=seq, role=role, content=f"{role} message {seq}")
            )
        session.commit()
        return conv.id


def stored_messages(engine: Engine, conversation_id: object, columns: str) -> list[dict[str, Any]]:
    """A conversation's message rows as stored, oldest first: `columns` is a SELECT list."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT {columns} FROM message WHERE conversation_id = :c ORDER BY seq"), {"c": conversation_id}
        )
        return [dict(row._mapping) for row in rows]
