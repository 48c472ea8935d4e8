"""The database half of a chat turn: one short transaction before the model runs, one statement after.

`begin_turn` resolves the request (a new message, a repeated idempotency key, a regenerate), claims
the conversation under a row lock (409 while another turn holds its lease), counts the turn against
the user's limits and stores the user message, then reads the history window. `finish_turn` stores
the reply and releases the lease in one statement, only while this turn still holds the lease (a
turn whose lease was taken over stores nothing over the new owner's). Lease times are the
database's clock (`now()`), never a replica's.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, text

from backend.failures import ConversationBusy, InvalidInput, RetrySuperseded
from backend.models import MessageStatus, Role
from backend.services import conversations, limits
from backend.services.conversations import MESSAGE, AnyRow, M

TITLE_CHARS = 60


@dataclass(frozen=True)
class TurnRequest:
    """What a front door asks of the turn service, from the verified user and a validated body."""

    user_id: str
    message: str
    conversation_id: uuid.UUID | None = None
    # The client's idempotency key: the same key and message again is the same request.
    idempotency_key: str | None = None
    # The id the stored user message gets, or names (ChatKit items are named before they are stored).
    user_message_id: uuid.UUID | None = None
    # Answer that user message again as a new attempt (ChatKit retry, AI SDK regenerate): what followed
    # it is removed, and its task changes run for real unless its last attempt never completed.
    regenerate: bool = False
    # `conversation_id` names a conversation to create for this user when it does not exist yet.
    create_if_missing: bool = False
    title: str | None = None


@dataclass(frozen=True)
class TurnPolicy:
    lease_seconds: float
    history_max_messages: int
    history_max_chars: int
    limits: limits.Limits


@dataclass(frozen=True)
class HistoryMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class StoredReply:
    """A finished answer, replayed for a repeated idempotency key."""

    message_id: uuid.UUID
    content: str
    tool_calls: list[dict[str, Any]]
    usage: dict[str, int] | None
    model: str | None
    duration_ms: int | None


@dataclass(frozen=True)
class BegunTurn:
    user_id: str
    conversation_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID
    turn_id: uuid.UUID
    # Names the attempt a turn's task changes are recorded under (see Message.completed_answers).
    replay_scope: str
    history: list[HistoryMessage]
    replay: StoredReply | None = None
    created: bool = False


def title_from(message: str) -> str:
    line = re.sub(r"\s+", " ", message).strip()
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


# --- begin ----------------------------------------------------------------------------------------------


def begin_turn(connection: Connection, request: TurnRequest, policy: TurnPolicy) -> BegunTurn:
    """Claim the conversation, store the user message and read the history, in the caller's transaction.

    Raises NotFound, ConversationBusy, RetrySuperseded, InvalidInput (a reused key) or LimitExceeded;
    a concurrent first use of the same idempotency key raises IntegrityError (the caller begins again).
    """
    existing = _existing_message(connection, request)
    conversation_id = existing.conversation_id if existing is not None else request.conversation_id
    created = False
    if conversation_id is None or (request.create_if_missing and existing is None):
        conversation_id, created = _create_conversation(connection, request, conversation_id)
    conversation = conversations.owned(connection, conversation_id, request.user_id, lock=True)

    removed = 0
    if existing is not None:
        reply = connection.execute(latest_reply_query(conversation_id, existing.id)).first()
        if reply is not None and reply.status == MessageStatus.complete and not request.regenerate:
            return _replay(request.user_id, conversation_id, existing, reply)
        if conversation.busy:
            raise ConversationBusy()
        if request.regenerate:
            removed = _remove_after(connection, existing)
        elif _answered_later(connection, conversation_id, existing.seq):
            raise RetrySuperseded()
    elif conversation.busy:
        raise ConversationBusy()

    limits.take_turn(connection, request.user_id, conversation_id, policy.limits)
    turn_id = uuid.uuid4()
    lease = {"conversation": conversation_id, "turn": turn_id, "lease": policy.lease_seconds, "removed": removed}
    if existing is None:
        user_message_id = request.user_message_id or uuid.uuid4()
        seq = connection.execute(
            _STORE_USER_MESSAGE,
            {
                **lease,
                "id": user_message_id,
                "user": request.user_id,
                "content": request.message,
                "key": request.idempotency_key,
            },
        ).scalar_one()
        answers = 0
    else:
        connection.execute(_TAKE_LEASE, lease)
        user_message_id, seq, answers = existing.id, existing.seq, existing.completed_answers
    return BegunTurn(
        user_id=request.user_id,
        conversation_id=conversation_id,
        user_message_id=user_message_id,
        assistant_message_id=uuid.uuid4(),
        turn_id=turn_id,
        replay_scope=f"{user_message_id}:{answers}",
        history=_history(connection, conversation_id, seq, policy.history_max_messages, policy.history_max_chars),
        created=created,
    )


def _existing_message(connection: Connection, request: TurnRequest) -> AnyRow | None:
    """The user message this request repeats, if any; a key used for something else is refused."""
    columns = (M.id, M.conversation_id, M.content, M.seq, M.completed_answers)
    if request.idempotency_key is not None:
        found: AnyRow | None = connection.execute(
            sa.select(*columns).where(M.user_id == request.user_id, M.client_message_id == request.idempotency_key)
        ).first()
        if found is not None and (
            found.content != request.message
            or (request.conversation_id is not None and found.conversation_id != request.conversation_id)
        ):
            raise InvalidInput(
                "This idempotency key was already used for another message",
                code="idempotency_key_reused",
                field=("body", "client_message_id"),
            )
        return found
    if request.user_message_id is not None and request.conversation_id is not None:
        named: AnyRow | None = connection.execute(
            sa.select(*columns).where(
                M.id == request.user_message_id,
                M.conversation_id == request.conversation_id,
                M.user_id == request.user_id,
                M.role == Role.user,
            )
        ).first()
        return named
    return None


def _create_conversation(
    connection: Connection, request: TurnRequest, conversation_id: uuid.UUID | None
) -> tuple[uuid.UUID, bool]:
    """A new conversation of this user (with the given id, unless it exists already)."""
    created = connection.execute(
        text(
            "INSERT INTO conversation (id, user_id, title, created_at, updated_at, last_seq, message_count)"
            " VALUES (:id, :user, :title, now(), now(), 0, 0) ON CONFLICT (id) DO NOTHING RETURNING id"
        ),
        {
            "id": conversation_id or uuid.uuid4(),
            "user": request.user_id,
            "title": request.title or title_from(request.message),
        },
    ).scalar()
    if created is None:
        assert conversation_id is not None  # only a given id can already exist
        return conversation_id, False
    return created, True


def latest_reply_query(conversation_id: uuid.UUID, user_message_id: uuid.UUID) -> sa.Select[Any]:
    """The newest reply to one user message: an index probe scoped to its conversation."""
    return (
        sa.select(M.id, M.status, M.content, M.tool_calls, M.usage, M.model, M.duration_ms)
        .where(M.conversation_id == conversation_id, M.reply_to == user_message_id)
        .order_by(M.seq.desc())
        .limit(1)
    )


def _replay(user_id: str, conversation_id: uuid.UUID, message: AnyRow, reply: AnyRow) -> BegunTurn:
    return BegunTurn(
        user_id=user_id,
        conversation_id=conversation_id,
        user_message_id=message.id,
        assistant_message_id=reply.id,
        turn_id=uuid.uuid4(),
        replay_scope="",
        history=[],
        replay=StoredReply(reply.id, reply.content, reply.tool_calls, reply.usage, reply.model, reply.duration_ms),
    )


def _answered_later(connection: Connection, conversation_id: uuid.UUID, seq: int) -> bool:
    later = sa.select(M.id).where(M.conversation_id == conversation_id, M.seq > seq, M.role == Role.user).limit(1)
    return connection.execute(later).first() is not None


def _remove_after(connection: Connection, message: AnyRow) -> int:
    """What followed a message that is answered again; its own failed or aborted attempts stay on record."""
    own_failures = sa.and_(M.reply_to.is_not(None), M.reply_to == message.id, M.status != MessageStatus.complete)
    removed = connection.execute(
        sa.delete(MESSAGE)
        .where(M.conversation_id == message.conversation_id, M.seq > message.seq, sa.not_(own_failures))
        .returning(M.id)
    )
    return len(removed.all())


# The lease is the database's clock plus the period; a regenerate may have removed messages.
_TAKE_LEASE = text(
    """
    UPDATE conversation SET turn_id = :turn, turn_lease_until = now() + make_interval(secs => :lease),
                            updated_at = now(), message_count = message_count - :removed
    WHERE id = :conversation
    """
)
_STORE_USER_MESSAGE = text(
    """
    WITH c AS (
        UPDATE conversation SET turn_id = :turn, turn_lease_until = now() + make_interval(secs => :lease),
                                updated_at = now(), last_seq = last_seq + 1,
                                message_count = message_count + 1 - :removed
        WHERE id = :conversation RETURNING last_seq
    )
    INSERT INTO message (id, conversation_id, user_id, seq, role, content, status, tool_calls, client_message_id,
                         completed_answers, created_at)
    SELECT :id, :conversation, :user, c.last_seq, 'user', :content, 'complete', '[]'::jsonb, :key, 0, now() FROM c
    RETURNING seq
    """
)


def _history(
    connection: Connection, conversation_id: uuid.UUID, upto_seq: int, max_messages: int, max_chars: int
) -> list[HistoryMessage]:
    """The newest messages up to `upto_seq` that fit the budget, oldest first.

    Failed or aborted assistant replies are left out: the model sees only what was really said.
    The message being answered is always included, even when it alone exceeds the budget.
    """
    rows = connection.execute(
        sa.select(M.role, M.content)
        .where(
            M.conversation_id == conversation_id,
            M.seq <= upto_seq,
            sa.or_(M.role == Role.user, M.status == MessageStatus.complete),
        )
        .order_by(M.seq.desc())
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


# --- while it runs, and after ----------------------------------------------------------------------------


_RENEW = text(
    "UPDATE conversation SET turn_lease_until = now() + make_interval(secs => :lease)"
    " WHERE id = :conversation AND turn_id = :turn RETURNING 1"
)


def renew_lease(connection: Connection, turn: BegunTurn, lease_seconds: float) -> bool:
    """Extend this turn's lease; False when it is no longer this turn's (taken over)."""
    params = {"conversation": turn.conversation_id, "turn": turn.turn_id, "lease": lease_seconds}
    return connection.execute(_RENEW, params).first() is not None


@dataclass(frozen=True)
class Outcome:
    """How a turn ended, as stored with its reply."""

    status: MessageStatus
    content: str
    tool_calls: list[dict[str, Any]]
    usage: dict[str, int]
    model: str
    duration_ms: int
    error_code: str | None = None


# One statement: the reply, the lease released, the user message's completed answers counted, and
# the tokens added to the user's day (see limits.py) - all only while this turn holds the lease.
_FINISH = text(
    """
    WITH c AS (
        UPDATE conversation SET last_seq = last_seq + 1, message_count = message_count + 1, updated_at = now(),
                                turn_id = NULL, turn_lease_until = NULL
        WHERE id = :conversation AND turn_id = :turn
        RETURNING last_seq, user_id
    ), reply AS (
        INSERT INTO message (id, conversation_id, user_id, seq, role, content, status, tool_calls, usage, model,
                             reply_to, error_code, duration_ms, completed_answers, created_at)
        SELECT :id, :conversation, c.user_id, c.last_seq, 'assistant', :content, :status, CAST(:tool_calls AS jsonb),
               CAST(:usage AS jsonb), :model, :reply_to, :error_code, :duration_ms, 0, now() FROM c
        RETURNING seq
    ), answered AS (
        UPDATE message SET completed_answers = completed_answers + 1
        WHERE id = :reply_to AND :status = 'complete' AND EXISTS (SELECT 1 FROM c)
    ), spent AS (
        UPDATE user_quota SET
            tokens_used = CASE WHEN tokens_day = (now() AT TIME ZONE 'UTC')::date
                               THEN tokens_used + :tokens ELSE :tokens END,
            tokens_day = (now() AT TIME ZONE 'UTC')::date
        WHERE user_id = :user AND :tokens > 0 AND EXISTS (SELECT 1 FROM c)
    )
    SELECT seq FROM reply
    """
)


def finish_turn(connection: Connection, turn: BegunTurn, outcome: Outcome) -> bool:
    """Store the reply and release the lease, only while this turn holds it. False: nothing stored."""
    stored = connection.execute(
        _FINISH,
        {
            "conversation": turn.conversation_id,
            "turn": turn.turn_id,
            "id": turn.assistant_message_id,
            "content": outcome.content,
            "status": outcome.status.value,
            "tool_calls": json.dumps(outcome.tool_calls, default=str),
            "usage": json.dumps(outcome.usage),
            "model": outcome.model,
            "reply_to": turn.user_message_id,
            "error_code": outcome.error_code,
            "duration_ms": outcome.duration_ms,
            "user": turn.user_id,
            "tokens": outcome.usage.get("total_tokens", 0),
        },
    ).first()
    return stored is not None
