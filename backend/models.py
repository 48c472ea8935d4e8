"""Tables (SQLModel) beside the public schemas the API returns.

The schema itself comes from Alembic migrations only; `SQLModel.metadata` is what
`migrations/env.py` compares against.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Annotated, Any

import pydantic
import sqlalchemy as sa
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts() -> Any:
    return Field(
        default_factory=utcnow,
        sa_column_kwargs={"server_default": sa.func.now()},
        sa_type=sa.DateTime(timezone=True),  # type: ignore[call-overload]
        nullable=False,
    )


class Role(StrEnum):
    user = "user"
    assistant = "assistant"


class MessageStatus(StrEnum):
    complete = "complete"
    error = "error"
    aborted = "aborted"


# --- tables -------------------------------------------------------------------------------------


class Conversation(SQLModel, table=True):
    __table_args__ = (
        sa.Index("ix_conversation_user_updated", "user_id", sa.text("updated_at DESC"), sa.text("id DESC")),
        # The user's conversations with a turn running (USER_CONCURRENT_TURNS): usually none.
        sa.Index("ix_conversation_user_running", "user_id", postgresql_where=sa.text("turn_id IS NOT NULL")),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: str = Field(max_length=255, nullable=False)
    title: str = Field(default="New conversation", max_length=200, nullable=False)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    # Last message sequence number handed out; bumped under the row lock, so order is strict.
    last_seq: int = Field(default=0, nullable=False)
    # Kept with every insert and delete of its messages, so listing never counts rows.
    message_count: int = Field(default=0, nullable=False)
    # The "turn running" lease: set when a turn starts, renewed while it runs, cleared when it ends.
    # A crashed replica's lease simply expires (by the database's clock), so another replica can take it.
    turn_id: uuid.UUID | None = Field(default=None)
    turn_lease_until: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))  # type: ignore[call-overload]


class Message(SQLModel, table=True):
    __table_args__ = (
        sa.UniqueConstraint("conversation_id", "seq", name="uq_message_conversation_seq"),
        # An idempotency key names one request of one user, whatever the conversation.
        sa.UniqueConstraint("user_id", "client_message_id", name="uq_message_user_client_id"),
        # A retry looks up the latest reply to one user message of one conversation.
        sa.Index(
            "ix_message_reply", "conversation_id", "reply_to", "seq", postgresql_where=sa.text("reply_to IS NOT NULL")
        ),
        sa.CheckConstraint("role IN ('user', 'assistant')", name="ck_message_role"),
        sa.CheckConstraint("status IN ('complete', 'error', 'aborted')", name="ck_message_status"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    conversation_id: uuid.UUID = Field(
        sa_column=sa.Column(sa.Uuid, sa.ForeignKey("conversation.id", ondelete="CASCADE"), nullable=False, index=False)
    )
    # The conversation's owner, copied here so idempotency keys are unique per user in the database.
    user_id: str = Field(max_length=255, nullable=False)
    seq: int = Field(nullable=False)
    role: str = Field(max_length=16, nullable=False)
    content: str = Field(default="", sa_type=sa.Text, nullable=False)  # type: ignore[call-overload]
    status: str = Field(default=MessageStatus.complete, max_length=16, nullable=False)
    tool_calls: list[dict[str, Any]] = Field(default_factory=list, sa_column=sa.Column(JSONB, nullable=False))
    usage: dict[str, int] | None = Field(default=None, sa_column=sa.Column(JSONB, nullable=True))
    model: str | None = Field(default=None, max_length=200)
    client_message_id: str | None = Field(default=None, max_length=200)
    # For an assistant message: the user message it answers (a retried turn answers the same one).
    reply_to: uuid.UUID | None = Field(default=None)
    error_code: str | None = Field(default=None, max_length=64)
    duration_ms: int | None = Field(default=None)
    # For a user message: how many of its answers completed. It names the attempt a turn's task changes
    # are recorded under: a recovered turn (the last attempt failed) reuses it, so its tool calls replay;
    # a regenerated answer comes after a completed one, gets a new value, and runs its tools for real.
    completed_answers: int = Field(default=0, nullable=False)
    created_at: datetime = _ts()


class UserQuota(SQLModel, table=True):
    """Per-user limit state, shared by every replica: one row per user that has taken a turn."""

    __tablename__ = "user_quota"

    user_id: str = Field(primary_key=True, max_length=255)
    # Turn starts are rate limited by GCRA: the theoretical arrival time of the next allowed turn.
    turn_tat: datetime = Field(sa_type=sa.DateTime(timezone=True), nullable=False)  # type: ignore[call-overload]
    # Model tokens spent on `tokens_day` (a UTC date), from the usage stored with each reply.
    tokens_day: date = Field(nullable=False)
    tokens_used: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)  # type: ignore[call-overload]


class Task(SQLModel, table=True):
    """Owned by the MCP server: the API never reads or writes it."""

    # Also the index for a user's list, which is ordered by number.
    __table_args__ = (sa.UniqueConstraint("user_id", "number", name="uq_task_user_number"),)

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(max_length=255, nullable=False)
    # The user's own task number (1, 2, 3, ...): what people say in chat and what tools call task_id.
    # Handed out by TaskCounter and never reused, so "task 3" in an old message never names another task.
    number: int = Field(nullable=False)
    title: str = Field(max_length=200, nullable=False)
    description: str | None = Field(default=None, max_length=1000)
    completed: bool = Field(default=False, nullable=False)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class TaskCounter(SQLModel, table=True):
    """Owned by the MCP server: the last task number handed out to each user.

    Bumped with INSERT ... ON CONFLICT DO UPDATE ... RETURNING, whose row lock serialises one user's
    concurrent adds; it never goes down, not even when tasks are deleted.
    """

    __tablename__ = "task_counter"

    user_id: str = Field(primary_key=True, max_length=255)
    last_number: int = Field(nullable=False)


class ToolCall(SQLModel, table=True):
    """Owned by the MCP server: the result of a task-changing tool call, keyed by the turn and call.

    A turn re-run after a failure (same user message) makes the same calls again; finding the
    result here, the MCP server answers it instead of adding the task a second time.
    """

    __tablename__ = "tool_call"
    __table_args__ = (sa.Index("ix_tool_call_created_at", "created_at"),)

    key: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(max_length=255, nullable=False)
    tool: str = Field(max_length=64, nullable=False)
    result: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    created_at: datetime = _ts()


# --- public schemas -----------------------------------------------------------------------------


def no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: refuse it at the edge instead of failing in the database.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


# Documented in the schema too, so generated clients (and fuzzers) know NUL is refused.
NO_NUL = pydantic.Field(json_schema_extra={"pattern": "^[^\\x00]*$"})
NOT_BLANK = pydantic.Field(json_schema_extra={"pattern": "^[^\\x00]*[^\\s\\x00][^\\x00]*$"})

Title = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), AfterValidator(no_nul), NOT_BLANK
]


class ToolCallOut(BaseModel):
    name: str
    arguments: dict[str, Any]
    result: Any = None


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    seq: int
    role: Role
    content: str
    status: MessageStatus
    tool_calls: list[ToolCallOut]
    usage: Usage | None
    model: str | None
    client_message_id: str | None
    reply_to: uuid.UUID | None
    error_code: str | None
    created_at: datetime


class ConversationSummary(BaseModel):
    id: uuid.UUID
    title: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    last_message_preview: str | None


class ConversationPage(BaseModel):
    data: list[ConversationSummary]
    next_cursor: str | None


class ConversationDetail(BaseModel):
    id: uuid.UUID
    title: str
    created_at: datetime
    updated_at: datetime
    messages: list[MessageOut]
    # Pass as `before` to read the page of older messages; null when this page reaches the start.
    next_before: uuid.UUID | None


MAX_MESSAGE_CHARS = 8000

MessageText = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_MESSAGE_CHARS),
    AfterValidator(no_nul),
    NOT_BLANK,
]
ClientMessageId = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(no_nul), NO_NUL]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: MessageText
    conversation_id: uuid.UUID | None = None
    # Idempotency key chosen by the client: a retry with the same id never makes a second turn.
    client_message_id: ClientMessageId | None = None


class ChatResponse(BaseModel):
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    response: str
    tool_calls: list[ToolCallOut]
    usage: Usage
    model: str
    duration_ms: int


class ConversationRename(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Title
