"""Conversation and message queries for both front doors (REST and ChatKit).

Every statement is scoped by `user_id`: ownership is part of the WHERE clause, so another user's
conversation and a missing one are the same `NotFound`. Functions take a Connection inside a
transaction the caller opened (`Database.run`) and raise domain failures, never HTTP errors.
Pagination is keyset: conversations by (updated_at, id) behind an opaque cursor, messages by their
per-conversation `seq` behind a message id.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy import Connection, Row
from sqlmodel import col

from backend.failures import ConversationBusy, InvalidInput, NotFound
from backend.models import Conversation, ConversationSummary, Message, MessageOut, Role

PREVIEW_CHARS = 120
MAX_UTC_OFFSET = timedelta(hours=15, minutes=59)

# A result row of any shape (SQLAlchemy types rows by their columns).
AnyRow: TypeAlias = Row[*tuple[Any, ...]]

CONVERSATION: sa.Table = Conversation.__table__  # type: ignore[attr-defined]
MESSAGE: sa.Table = Message.__table__  # type: ignore[attr-defined]
C, M = CONVERSATION.c, MESSAGE.c


def lease_held() -> sa.ColumnElement[bool]:
    """A turn runs on the conversation: its lease has not run out by the database's clock."""
    return col(Conversation.turn_lease_until) > sa.func.now()


@dataclass(frozen=True, slots=True)
class OwnedRow:
    """A conversation its user asked for: found by id AND user id."""

    id: uuid.UUID
    title: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    busy: bool  # a turn holds its lease


def owned(connection: Connection, conversation_id: uuid.UUID, user_id: str, *, lock: bool = False) -> OwnedRow:
    """The conversation if this user owns it; NotFound otherwise (someone else's is missing too).
    `lock` holds its row until the transaction ends: turns on one conversation never interleave."""
    query = sa.select(
        C.id,
        C.title,
        C.created_at,
        C.updated_at,
        C.message_count,
        sa.func.coalesce(lease_held(), sa.false()).label("busy"),
    ).where(C.id == conversation_id, C.user_id == user_id)
    if lock:
        query = query.with_for_update(of=CONVERSATION)
    row = connection.execute(query).first()
    if row is None:
        raise NotFound()
    return OwnedRow(*row)


# --- conversations -----------------------------------------------------------------------------------


def encode_cursor(updated_at: datetime, conversation_id: uuid.UUID) -> str:
    raw = json.dumps({"u": updated_at.astimezone(UTC).isoformat(), "i": str(conversation_id)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, field: tuple[str, str]) -> tuple[datetime, uuid.UUID]:
    """The (updated_at, id) a cursor names. Anything PostgreSQL could not compare is InvalidInput."""
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        updated_at = datetime.fromisoformat(data["u"])
        offset = updated_at.utcoffset()
        # Cursors we issue carry a UTC offset PostgreSQL accepts (it refuses beyond ±15:59); any other
        # value is not ours. Converted to UTC here, a date out of range fails here, not in the query.
        if offset is None or abs(offset) > MAX_UTC_OFFSET:
            raise ValueError("not a cursor timestamp")
        return updated_at.astimezone(UTC), uuid.UUID(data["i"])
    except (binascii.Error, ValueError, KeyError, TypeError, OverflowError) as error:
        raise InvalidInput("cursor is not valid", code="invalid_cursor", field=field) from error


def conversation_page(
    connection: Connection,
    user_id: str,
    *,
    limit: int,
    after: str | None,
    descending: bool = True,
    preview: bool = False,
    cursor_field: tuple[str, str] = ("query", "cursor"),
) -> tuple[list[AnyRow], bool]:
    """One page in (updated_at, id) order, served by the user index, and whether more follow."""
    columns: list[Any] = [C.id, C.title, C.created_at, C.updated_at, C.message_count]
    if preview:
        columns.append(_preview(C.id))
    query = sa.select(*columns).where(C.user_id == user_id)
    key = sa.tuple_(C.updated_at, C.id)
    if after:
        anchor = sa.tuple_(*decode_cursor(after, cursor_field))
        query = query.where(key < anchor if descending else key > anchor)
    ordering = (C.updated_at.desc(), C.id.desc()) if descending else (C.updated_at.asc(), C.id.asc())
    rows = list(connection.execute(query.order_by(*ordering).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cursor_after(rows: list[AnyRow]) -> str | None:
    """The cursor that continues after the last of these conversations."""
    return encode_cursor(rows[-1].updated_at, rows[-1].id) if rows else None


def _preview(conversation_id: Any) -> sa.Label[str | None]:
    """The newest non-empty message's start: one index probe on (conversation_id, seq) per row."""
    return (
        sa.select(sa.func.left(M.content, PREVIEW_CHARS))
        .where(M.conversation_id == conversation_id, M.content != "")
        .order_by(M.seq.desc())
        .limit(1)
        .scalar_subquery()
        .label("preview")
    )


def summary(row: AnyRow) -> ConversationSummary:
    return ConversationSummary(
        id=row.id,
        title=row.title,
        created_at=row.created_at,
        updated_at=row.updated_at,
        message_count=row.message_count,
        last_message_preview=getattr(row, "preview", None),
    )


def rename(connection: Connection, conversation_id: uuid.UUID, user_id: str, title: str) -> ConversationSummary:
    # Renaming is not activity: updated_at (the list order) is left alone.
    row = connection.execute(
        sa.update(CONVERSATION)
        .where(C.id == conversation_id, C.user_id == user_id)
        .values(title=title)
        .returning(C.id, C.title, C.created_at, C.updated_at, C.message_count, _preview(C.id))
    ).first()
    if row is None:
        raise NotFound()
    return summary(row)


def delete(connection: Connection, conversation_id: uuid.UUID, user_id: str) -> None:
    """Delete it and its messages (ON DELETE CASCADE); never from under a running turn."""
    if owned(connection, conversation_id, user_id, lock=True).busy:
        raise ConversationBusy()
    connection.execute(sa.delete(CONVERSATION).where(C.id == conversation_id))


# --- messages ----------------------------------------------------------------------------------------------


def shown() -> sa.ColumnElement[bool]:
    """Messages a transcript shows: an assistant reply that failed before saying or doing anything
    stays on record (REST lists it) but has nothing to show in ChatKit. One that called tools shows them."""
    return sa.or_(M.role == Role.user, M.content != "", sa.func.jsonb_array_length(M.tool_calls) > 0)


def message_page(
    connection: Connection,
    conversation_id: uuid.UUID,
    *,
    limit: int,
    after: uuid.UUID | None,
    descending: bool,
    field: tuple[str, str],
    only_shown: bool = False,
) -> tuple[list[AnyRow], bool]:
    """Messages in `seq` order starting after message `after` (exclusive), and whether more follow."""
    query = sa.select(MESSAGE).where(M.conversation_id == conversation_id)
    if only_shown:
        query = query.where(shown())
    if after is not None:
        anchor = connection.execute(
            sa.select(M.seq).where(M.conversation_id == conversation_id, M.id == after)
        ).scalar()
        if anchor is None:
            raise InvalidInput(
                f"{field[1]} is not a message of this conversation", code=_anchor_code(field), field=field
            )
        query = query.where(M.seq < anchor if descending else M.seq > anchor)
    rows = list(connection.execute(query.order_by(M.seq.desc() if descending else M.seq.asc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _anchor_code(field: tuple[str, str]) -> str:
    return "invalid_before" if field[1] == "before" else "invalid_cursor"


def message_out(row: AnyRow) -> MessageOut:
    return MessageOut.model_validate(row._mapping)


def find_message(connection: Connection, conversation_id: uuid.UUID, message_id: uuid.UUID) -> AnyRow | None:
    return connection.execute(
        sa.select(MESSAGE).where(M.conversation_id == conversation_id, M.id == message_id, shown())
    ).first()
