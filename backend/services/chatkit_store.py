"""A ChatKit `Store` over our tables: a thread is a conversation, its items are the messages, each
reply preceded by its task tool calls (completed `client_tool_call` items from the stored reply).

Every query is scoped by the user of the request (the verified JWT's `sub`, the only thing the
context carries besides this request's own scratch), so another user's thread answers exactly like
a missing one. Each call is one unit of `Database.run`; nothing is held between calls.

Messages are written by the turn service only. The user's message is stored by `begin` (which also
claims the conversation and checks the user's limits): ChatKit asks the store to add the user item
before it announces it, so that is where the turn begins, and a refused turn is never announced.
A new thread is created by that same transaction, so a refused first message leaves no empty
thread behind. The assistant message is stored when the run ends, whatever way it ends; ChatKit's
own writes of it are no-ops here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chatkit.store import NotFoundError, Store, StoreItemType
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageItem,
    Attachment,
    ClientToolCallItem,
    InferenceOptions,
    Page,
    ThreadItem,
    ThreadMetadata,
    UserMessageItem,
    UserMessageTextContent,
)
from pydantic import TypeAdapter
from sqlalchemy import Connection

from backend.db import Database
from backend.failures import InvalidInput, UnsupportedRequest
from backend.models import MessageText, Role, Title
from backend.services import conversations
from backend.services.conversations import AnyRow
from backend.services.turn import TurnService, TurnStream
from backend.services.turn_store import BegunTurn, TurnRequest, title_from

MAX_PAGE = 100
# Tool call items are named after their reply: "<message id>:tool:<n>".
TOOL_ITEM = ":tool:"
_TITLE: TypeAdapter[str] = TypeAdapter(Title)
_MESSAGE: TypeAdapter[str] = TypeAdapter(MessageText)


@dataclass
class ChatKitContext:
    """Who is asking (from the verified JWT), plus this request's own scratch."""

    user_id: str
    # Threads this request created (threads.create): stored with their first message, by the turn.
    new_threads: dict[str, str | None] = field(default_factory=dict)
    # The turn this request began, and its stream once it runs: closed when the response ends.
    turn: BegunTurn | None = None
    stream: TurnStream | None = None
    regenerate: bool = False


def attachments_refused() -> UnsupportedRequest:
    return UnsupportedRequest("File attachments are not supported; send text only", code="attachments_not_supported")


def clean_title(title: str) -> str:
    """Raises pydantic's ValidationError (a 422) for an empty, too long or NUL-carrying title."""
    return _TITLE.validate_python(title)


def message_text(item: UserMessageItem) -> str:
    """The text the turn stores and the model reads; raises ValidationError like /api/chat's 422."""
    text = "".join(part.text for part in item.content)
    if item.quoted_text:
        text = f"> {item.quoted_text}\n\n{text}"
    return _MESSAGE.validate_python(text)


def thread_uuid(thread_id: str) -> uuid.UUID:
    """Thread ids are conversation UUIDs; anything else names no thread."""
    try:
        return uuid.UUID(thread_id)
    except ValueError:
        raise NotFoundError(f"Thread {thread_id} not found") from None


def tool_item_id(message_id: str | uuid.UUID, index: int) -> str:
    """The item of the `index`th tool call of an assistant message (in the order they were called)."""
    return f"{message_id}{TOOL_ITEM}{index}"


def tool_item(thread_id: str, item_id: str, created_at: datetime, call: dict[str, Any]) -> ClientToolCallItem:
    """A task tool call as ChatKit's record of a finished tool call (our tools run on the server,
    but the protocol's completed client tool call is what carries a name, arguments and output)."""
    return ClientToolCallItem(
        id=item_id,
        thread_id=thread_id,
        created_at=created_at,
        status="completed",
        call_id=item_id,  # the model's own call id is not stored; the item id names the call as well
        name=call["name"],
        arguments=call["arguments"],
        output=call.get("result"),
    )


def to_items(message: AnyRow) -> list[ThreadItem]:
    """A user message is one item; an assistant message is its tool calls, then its text."""
    thread_id, item_id = str(message.conversation_id), str(message.id)
    if message.role == Role.user:
        return [
            UserMessageItem(
                id=item_id,
                thread_id=thread_id,
                created_at=message.created_at,
                content=[UserMessageTextContent(text=message.content)],
                inference_options=InferenceOptions(),
            )
        ]
    items: list[ThreadItem] = [
        tool_item(thread_id, tool_item_id(item_id, index), message.created_at, call)
        for index, call in enumerate(message.tool_calls)
    ]
    if message.content or not items:
        items.append(
            AssistantMessageItem(
                id=item_id,
                thread_id=thread_id,
                created_at=message.created_at,
                content=[AssistantMessageContent(text=message.content)],
            )
        )
    return items


class ConversationStore(Store[ChatKitContext]):
    def __init__(self, db: Database, turns: TurnService) -> None:
        self._db = db
        self._turns = turns

    # --- ids: conversation and message ids are UUIDs ------------------------------------------

    def generate_thread_id(self, context: ChatKitContext) -> str:
        thread_id = str(uuid.uuid4())
        context.new_threads[thread_id] = None
        return thread_id

    def generate_item_id(self, item_type: StoreItemType, thread: ThreadMetadata, context: ChatKitContext) -> str:
        # The user message item's id becomes the stored message's id (TurnRequest.user_message_id).
        return str(uuid.uuid4())

    # --- threads -------------------------------------------------------------------------------

    async def load_thread(self, thread_id: str, context: ChatKitContext) -> ThreadMetadata:
        conversation_id, user = thread_uuid(thread_id), context.user_id
        found = await self._db.run(lambda c: conversations.owned(c, conversation_id, user))
        return ThreadMetadata(id=thread_id, title=found.title, created_at=found.created_at)

    async def save_thread(self, thread: ThreadMetadata, context: ChatKitContext) -> None:
        """A new thread waits for its first message (the turn creates it); an owned one is renamed."""
        title = clean_title(thread.title) if thread.title is not None else None
        if thread.id in context.new_threads:
            context.new_threads[thread.id] = title
            return
        if title is not None:
            conversation_id, user = thread_uuid(thread.id), context.user_id
            await self._db.run(lambda c: conversations.rename(c, conversation_id, user, title))

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: ChatKitContext
    ) -> Page[ThreadMetadata]:
        """Keyset pages on (updated_at, id), the order of GET /api/conversations; `after` is its cursor."""
        limit, user = max(1, min(limit, MAX_PAGE)), context.user_id
        rows, more = await self._db.run(
            lambda c: conversations.conversation_page(
                c, user, limit=limit, after=after, descending=order != "asc", cursor_field=("body", "after")
            )
        )
        threads = [ThreadMetadata(id=str(row.id), title=row.title, created_at=row.created_at) for row in rows]
        return Page(data=threads, has_more=more, after=conversations.cursor_after(rows))

    async def delete_thread(self, thread_id: str, context: ChatKitContext) -> None:
        conversation_id, user = thread_uuid(thread_id), context.user_id
        await self._db.run(lambda c: conversations.delete(c, conversation_id, user))

    # --- items ---------------------------------------------------------------------------------

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: ChatKitContext
    ) -> Page[ThreadItem]:
        """Messages in their strict order (`seq`); `after` is the id of the last item already seen."""
        conversation_id, user = thread_uuid(thread_id), context.user_id
        anchor = _cursor_uuid(after) if after is not None else None

        def work(connection: Connection) -> tuple[list[AnyRow], bool]:
            conversations.owned(connection, conversation_id, user)
            return conversations.message_page(
                connection,
                conversation_id,
                limit=max(1, min(limit, MAX_PAGE)),
                after=anchor,
                descending=order == "desc",
                field=("body", "after"),
                only_shown=True,
            )

        rows, more = await self._db.run(work)
        # Pages count messages; each brings its tool call items along, so a page never splits a reply.
        items = [item for row in rows for item in (to_items(row) if order != "desc" else to_items(row)[::-1])]
        return Page(data=items, has_more=more, after=str(rows[-1].id) if rows else None)

    async def load_item(self, thread_id: str, item_id: str, context: ChatKitContext) -> ThreadItem:
        conversation_id, user, message_id = thread_uuid(thread_id), context.user_id, _item_uuid(item_id)

        def work(connection: Connection) -> AnyRow | None:
            conversations.owned(connection, conversation_id, user)
            return conversations.find_message(connection, conversation_id, message_id)

        message = await self._db.run(work)
        found = [item for item in to_items(message) if item.id == item_id] if message is not None else []
        if not found:
            raise NotFoundError(f"Item {item_id} not found")
        return found[0]

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: ChatKitContext) -> None:
        """For the user's new message: begin the turn, which stores it (or refuses, before ChatKit
        announces it). Assistant messages are stored by the turn when it ends."""
        if isinstance(item, UserMessageItem) and context.turn is None:
            new = thread_id in context.new_threads
            text = message_text(item)
            context.turn = await self._turns.begin(
                TurnRequest(
                    context.user_id,
                    text,
                    conversation_id=thread_uuid(thread_id),
                    user_message_id=_item_uuid(item.id),
                    create_if_missing=new,
                    title=context.new_threads.pop(thread_id, None) or title_from(text),
                )
            )

    async def save_item(self, thread_id: str, item: ThreadItem, context: ChatKitContext) -> None:
        """Only replaced widget/tool/structured-input items come here; this server produces none."""

    async def delete_thread_item(self, thread_id: str, item_id: str, context: ChatKitContext) -> None:
        """ChatKit's retry removes the items after the retried message first; the turn does that
        itself, in the transaction that claims the conversation (so a busy one loses nothing)."""

    # --- attachments: refused ------------------------------------------------------------------

    async def save_attachment(self, attachment: Attachment, context: ChatKitContext) -> None:
        raise attachments_refused()

    async def load_attachment(self, attachment_id: str, context: ChatKitContext) -> Attachment:
        raise attachments_refused()

    async def delete_attachment(self, attachment_id: str, context: ChatKitContext) -> None:
        raise attachments_refused()


def _item_uuid(item_id: str) -> uuid.UUID:
    """The message an item belongs to: the message itself, or the reply that made the tool call."""
    try:
        return uuid.UUID(item_id.partition(TOOL_ITEM)[0])
    except ValueError:
        raise NotFoundError(f"Item {item_id} not found") from None


def _cursor_uuid(after: str) -> uuid.UUID:
    # A tool call item's id continues after its whole reply (pages never split one).
    try:
        return uuid.UUID(after.partition(TOOL_ITEM)[0])
    except ValueError:
        raise InvalidInput(
            "after is not an item of this thread", code="invalid_cursor", field=("body", "after")
        ) from None
