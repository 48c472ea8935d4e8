"""The database half of a chat turn: short transactions before and after the model runs.

`begin_turn` and `finish_turn` each hold a row lock on the conversation for a few milliseconds;
nothing here runs while the model thinks. The "turn running" mark is a lease (`turn_id`,
`turn_lease_until`) that the running turn renews, so a crashed replica blocks a conversation for
at most one lease period.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from backend.db import session_scope
from backend.errors import ApiError, not_found
from backend.models import Conversation, Message, MessageStatus, Role, utcnow
from backend.services.conversations import get_owned

TITLE_CHARS = 60


@dataclass(frozen=True)
class HistoryMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class StoredReply:
    """A finished assistant message, replayed for a repeated `client_message_id`."""

    message_id: uuid.UUID
    content: str
    tool_calls: list[dict[str, Any]]
    usage: dict[str, int] | None
    model: str | None
    duration_ms: int | None


@dataclass(frozen=True)
class BegunTurn:
    conversation_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID
    turn_id: uuid.UUID
    history: list[HistoryMessage] = field(default_factory=list)
    replay: StoredReply | None = None
    created: bool = False


def title_from(message: str) -> str:
    line = re.sub(r"\s+", " ", message).strip()
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


def busy() -> ApiError:
    return ApiError(409, "conversation_busy", "A reply is already being generated in this conversation", retryable=True)


def begin_turn(
    engine: Engine,
    *,
    user_id: str,
    message: str,
    conversation_id: uuid.UUID | None,
    client_message_id: str | None,
    lease_seconds: float,
    history_max_messages: int,
    history_max_chars: int,
    user_message_id: uuid.UUID | None = None,
) -> BegunTurn:
    """Claim the conversation, store the user message and read the history, in one transaction.

    `user_message_id` (ChatKit names its items before they are stored) is the id a new user message
    gets; a user message of this conversation that already has it is answered again, like a repeated
    `client_message_id` (ChatKit's retry).
    """
    now = utcnow()
    with session_scope(engine) as session:
        if conversation_id is None and client_message_id is not None:
            # A retried "new conversation" request: find the conversation its first attempt made.
            conversation_id = session.exec(
                select(Message.conversation_id)
                .join(Conversation, col(Conversation.id) == col(Message.conversation_id))
                .where(
                    Conversation.user_id == user_id,
                    Message.client_message_id == client_message_id,
                    Message.seq == 1,
                )
                .limit(1)
            ).first()
        created = conversation_id is None
        if conversation_id is None:
            conversation = Conversation(user_id=user_id, title=title_from(message), created_at=now, updated_at=now)
            session.add(conversation)
            session.flush()
        else:
            found = get_owned(session, conversation_id, user_id, lock=True)
            if found is None:
                raise not_found()
            conversation = found

        existing = None
        keys: list[sa.ColumnElement[bool]] = []
        if client_message_id is not None:
            keys.append(col(Message.client_message_id) == client_message_id)
        if user_message_id is not None:
            keys.append(sa.and_(col(Message.id) == user_message_id, col(Message.role) == Role.user))
        if keys and not created:
            existing = session.exec(
                select(Message).where(Message.conversation_id == conversation.id, sa.or_(*keys))
            ).first()
        if existing is not None:
            reply = _latest_reply(session, existing.id)
            if reply is not None and reply.status == MessageStatus.complete:
                return BegunTurn(
                    conversation_id=conversation.id,
                    user_message_id=existing.id,
                    assistant_message_id=reply.id,
                    turn_id=uuid.uuid4(),
                    replay=StoredReply(
                        reply.id, reply.content, reply.tool_calls, reply.usage, reply.model, reply.duration_ms
                    ),
                )
        if conversation.turn_lease_until is not None and conversation.turn_lease_until > now:
            raise busy()

        if existing is None:
            conversation.last_seq += 1
            existing = Message(
                id=user_message_id or uuid.uuid4(),
                conversation_id=conversation.id,
                seq=conversation.last_seq,
                role=Role.user,
                content=message,
                client_message_id=client_message_id,
                created_at=now,
            )
            session.add(existing)
        turn_id = uuid.uuid4()
        conversation.turn_id = turn_id
        conversation.turn_lease_until = now + timedelta(seconds=lease_seconds)
        conversation.updated_at = now
        session.add(conversation)
        session.flush()
        history = _history(session, conversation.id, existing.seq, history_max_messages, history_max_chars)
        return BegunTurn(
            conversation_id=conversation.id,
            user_message_id=existing.id,
            assistant_message_id=uuid.uuid4(),
            turn_id=turn_id,
            history=history,
            created=created,
        )


def _latest_reply(session: Session, user_message_id: uuid.UUID) -> Message | None:
    return session.exec(
        select(Message).where(Message.reply_to == user_message_id).order_by(col(Message.seq).desc()).limit(1)
    ).first()


def _history(
    session: Session, conversation_id: uuid.UUID, upto_seq: int, max_messages: int, max_chars: int
) -> list[HistoryMessage]:
    """The newest messages up to `upto_seq` that fit the budget, oldest first.

    Failed or aborted assistant replies are left out: the model sees only what was really said.
    The message being answered is always included, even when it alone exceeds the budget.
    """
    rows = session.exec(
        select(Message.role, Message.content)
        .where(
            Message.conversation_id == conversation_id,
            Message.seq <= upto_seq,
            sa.or_(col(Message.role) == Role.user, col(Message.status) == MessageStatus.complete),
        )
        .order_by(col(Message.seq).desc())
        .limit(max_messages)
    ).all()
    picked: list[HistoryMessage] = []
    used = 0
    for role, content in rows:
        if picked and used + len(content) > max_chars:
            break
        used += len(content)
        picked.append(HistoryMessage(Role(role), content))
    picked.reverse()
    # A window that starts with an assistant message reads oddly to models; start with the user.
    while len(picked) > 1 and picked[0].role == Role.assistant:
        picked.pop(0)
    return picked


def renew_lease(engine: Engine, conversation_id: uuid.UUID, turn_id: uuid.UUID, lease_seconds: float) -> bool:
    with session_scope(engine) as session:
        result = session.execute(
            sa.update(Conversation)
            .where(col(Conversation.id) == conversation_id, col(Conversation.turn_id) == turn_id)
            .values(turn_lease_until=utcnow() + timedelta(seconds=lease_seconds))
        )
        return bool(getattr(result, "rowcount", 0))


def finish_turn(
    engine: Engine,
    turn: BegunTurn,
    *,
    content: str,
    status: MessageStatus,
    tool_calls: list[dict[str, Any]],
    usage: dict[str, int] | None,
    model: str,
    duration_ms: int,
    error_code: str | None = None,
) -> datetime | None:
    """Store the assistant message and release the lease. None if the conversation was deleted meanwhile."""
    now = utcnow()
    with session_scope(engine) as session:
        conversation = session.exec(
            select(Conversation).where(Conversation.id == turn.conversation_id).with_for_update()
        ).first()
        if conversation is None:
            return None
        conversation.last_seq += 1
        session.add(
            Message(
                id=turn.assistant_message_id,
                conversation_id=conversation.id,
                seq=conversation.last_seq,
                role=Role.assistant,
                content=content,
                status=status,
                tool_calls=tool_calls,
                usage=usage,
                model=model,
                reply_to=turn.user_message_id,
                error_code=error_code,
                duration_ms=duration_ms,
                created_at=now,
            )
        )
        if conversation.turn_id == turn.turn_id:
            conversation.turn_id = None
            conversation.turn_lease_until = None
        conversation.updated_at = now
        session.add(conversation)
        return now
