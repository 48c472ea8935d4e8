"""A ChatKit `Store` over our tables: a thread is a conversation, its items are the messages.

Every query is scoped by the user of the request (the JWT's `sub`, carried in the context), so
another user's thread answers exactly like a missing one. Database work runs in a worker thread
with a short session of its own; nothing is held between calls.

Messages are written by the turn service only (services/turn.py): it stores the user message in
the transaction that claims the conversation (a busy conversation gets nothing) and the assistant
message when the run ends, whatever way it ends. So the item writes `ChatKitServer` makes around
`respond()` have nothing left to do, and are no-ops for messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import sqlalchemy as sa
from chatkit.store import NotFoundError, Store, StoreItemType
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageItem,
    Attachment,
    InferenceOptions,
    Page,
    ThreadItem,
    ThreadMetadata,
    UserMessageItem,
    UserMessageTextContent,
)
from pydantic import TypeAdapter
from sqlmodel import Session, col, select

from backend.db import session_scope
from backend.errors import ApiError, invalid
from backend.models import Conversation, Message, Role, Title, utcnow
from backend.services import conversations
from backend.services.turn import TurnDeps
from backend.services.turn_store import busy

T = TypeVar("T")

MAX_PAGE = 100
_TITLE: TypeAdapter[str] = TypeAdapter(Title)


@dataclass
class ChatKitContext:
    """Per request: who is asking (from the verified JWT) and the process-wide turn plumbing."""

    user_id: str
    deps: TurnDeps
    # Ids this request handed out for new threads: only these may be inserted by `save_thread`.
    new_thread_ids: set[str] = field(default_factory=set)


def attachments_refused() -> ApiError:
    return ApiError(400, "attachments_not_supported", "File attachments are not supported; send text only")


def clean_title(title: str) -> str:
    """Raises pydantic's ValidationError (a 422) for an empty, too long or NUL-carrying title."""
    return _TITLE.validate_python(title)


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _owned(session: Session, thread_id: str, user_id: str, *, lock: bool = False) -> Conversation:
    conversation_id = _uuid(thread_id)
    found = conversations.get_owned(session, conversation_id, user_id, lock=lock) if conversation_id else None
    if found is None:
        raise NotFoundError(f"Thread {thread_id} not found")
    return found


def _thread(conversation: Conversation) -> ThreadMetadata:
    return ThreadMetadata(id=str(conversation.id), title=conversation.title, created_at=conversation.created_at)


def _shown() -> sa.ColumnElement[bool]:
    # An assistant reply that failed before saying anything stays on record (REST shows it) but has
    # nothing to show in ChatKit's transcript.
    return sa.or_(col(Message.role) == Role.user, col(Message.content) != "")


def to_item(message: Message) -> ThreadItem:
    thread_id, item_id = str(message.conversation_id), str(message.id)
    if message.role == Role.user:
        return UserMessageItem(
            id=item_id,
            thread_id=thread_id,
            created_at=message.created_at,
            content=[UserMessageTextContent(text=message.content)],
            inference_options=InferenceOptions(),
        )
    return AssistantMessageItem(
        id=item_id,
        thread_id=thread_id,
        created_at=message.created_at,
        content=[AssistantMessageContent(text=message.content)],
    )


class ConversationStore(Store[ChatKitContext]):
    async def _db(self, context: ChatKitContext, work: Callable[[Session], T]) -> T:
        def run() -> T:
            with session_scope(context.deps.engine) as session:
                return work(session)

        return await anyio.to_thread.run_sync(run)

    # --- ids: conversation and message ids are UUIDs ------------------------------------------

    def generate_thread_id(self, context: ChatKitContext) -> str:
        thread_id = str(uuid.uuid4())
        context.new_thread_ids.add(thread_id)
        return thread_id

    def generate_item_id(self, item_type: StoreItemType, thread: ThreadMetadata, context: ChatKitContext) -> str:
        # The user message item's id becomes the stored message's id (see TurnInput.user_message_id).
        return str(uuid.uuid4())

    # --- threads -------------------------------------------------------------------------------

    async def load_thread(self, thread_id: str, context: ChatKitContext) -> ThreadMetadata:
        return _thread(await self._db(context, lambda s: _owned(s, thread_id, context.user_id)))

    async def save_thread(self, thread: ThreadMetadata, context: ChatKitContext) -> None:
        """Insert a thread this request created (threads.create), else rename an owned one."""

        def work(session: Session) -> None:
            conversation_id = _uuid(thread.id)
            found = conversations.get_owned(session, conversation_id, context.user_id) if conversation_id else None
            if found is None:
                if conversation_id is None or thread.id not in context.new_thread_ids:
                    raise NotFoundError(f"Thread {thread.id} not found")
                now = utcnow()
                created = Conversation(id=conversation_id, user_id=context.user_id, created_at=now, updated_at=now)
                if thread.title is not None:
                    created.title = clean_title(thread.title)
                session.add(created)
            elif thread.title is not None and thread.title != found.title:
                conversations.rename(session, found, clean_title(thread.title))

        await self._db(context, work)

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: ChatKitContext
    ) -> Page[ThreadMetadata]:
        """Keyset pages on (updated_at, id), the order of GET /api/conversations; `after` is its cursor."""
        limit = max(1, min(limit, MAX_PAGE))
        desc = order != "asc"

        def work(session: Session) -> Page[ThreadMetadata]:
            query = select(Conversation).where(Conversation.user_id == context.user_id)
            key = sa.tuple_(Conversation.updated_at, Conversation.id)
            if after:
                anchor = sa.tuple_(*conversations.decode_cursor(after))
                query = query.where(key < anchor if desc else key > anchor)
            updated, ident = col(Conversation.updated_at), col(Conversation.id)
            ordering = (updated.desc(), ident.desc()) if desc else (updated.asc(), ident.asc())
            rows = list(session.exec(query.order_by(*ordering).limit(limit + 1)).all())
            page = rows[:limit]
            cursor = conversations.encode_cursor(page[-1].updated_at, page[-1].id) if page else None
            return Page(data=[_thread(c) for c in page], has_more=len(rows) > limit, after=cursor)

        return await self._db(context, work)

    async def delete_thread(self, thread_id: str, context: ChatKitContext) -> None:
        await self._db(context, lambda s: conversations.delete(s, _owned(s, thread_id, context.user_id, lock=True)))

    # --- items ---------------------------------------------------------------------------------

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: ChatKitContext
    ) -> Page[ThreadItem]:
        """Messages in their strict order (`seq`); `after` is the id of the last item already seen."""
        limit = max(1, min(limit, MAX_PAGE))
        desc = order == "desc"

        def work(session: Session) -> Page[ThreadItem]:
            conversation = _owned(session, thread_id, context.user_id)
            query = select(Message).where(Message.conversation_id == conversation.id, _shown())
            if after is not None:
                after_id = _uuid(after)
                anchor = (
                    session.exec(
                        select(Message.seq).where(Message.conversation_id == conversation.id, Message.id == after_id)
                    ).first()
                    if after_id
                    else None
                )
                if anchor is None:
                    raise invalid("body", "after", "after is not an item of this thread", "invalid_cursor")
                query = query.where(Message.seq < anchor if desc else Message.seq > anchor)
            seq = col(Message.seq)
            rows = list(session.exec(query.order_by(seq.desc() if desc else seq.asc()).limit(limit + 1)).all())
            page = rows[:limit]
            return Page(
                data=[to_item(m) for m in page],
                has_more=len(rows) > limit,
                after=str(page[-1].id) if page else None,
            )

        return await self._db(context, work)

    async def load_item(self, thread_id: str, item_id: str, context: ChatKitContext) -> ThreadItem:
        def work(session: Session) -> ThreadItem:
            conversation = _owned(session, thread_id, context.user_id)
            message_id = _uuid(item_id)
            message = (
                session.exec(
                    select(Message).where(
                        Message.conversation_id == conversation.id, Message.id == message_id, _shown()
                    )
                ).first()
                if message_id
                else None
            )
            if message is None:
                raise NotFoundError(f"Item {item_id} not found")
            return to_item(message)

        return await self._db(context, work)

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: ChatKitContext) -> None:
        # The turn service has stored (user message, in begin()) or stores (assistant message, when
        # the run ends) every message ChatKitServer reports here: storing again would duplicate it.
        if isinstance(item, UserMessageItem | AssistantMessageItem):
            return
        raise NotImplementedError(f"{item.type} items are not stored by this server")

    async def save_item(self, thread_id: str, item: ThreadItem, context: ChatKitContext) -> None:
        # Only replaced widget/tool/structured-input items come here; this server produces none.
        raise NotImplementedError("thread items are written by the turn service only")

    async def delete_thread_item(self, thread_id: str, item_id: str, context: ChatKitContext) -> None:
        """ChatKit's retry removes the items after the retried message before answering it again."""

        def work(session: Session) -> None:
            conversation = _owned(session, thread_id, context.user_id, lock=True)
            lease = conversation.turn_lease_until
            if lease is not None and lease > utcnow():
                raise busy()  # never pull a message from under a running turn
            message_id = _uuid(item_id)
            if message_id is not None:
                session.execute(
                    sa.delete(Message).where(
                        col(Message.conversation_id) == conversation.id, col(Message.id) == message_id
                    )
                )

        await self._db(context, work)

    # --- attachments: refused ------------------------------------------------------------------

    async def save_attachment(self, attachment: Attachment, context: ChatKitContext) -> None:
        raise attachments_refused()

    async def load_attachment(self, attachment_id: str, context: ChatKitContext) -> Attachment:
        raise attachments_refused()

    async def delete_attachment(self, attachment_id: str, context: ChatKitContext) -> None:
        raise attachments_refused()
