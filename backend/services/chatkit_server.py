"""The ChatKit front door of the one turn service.

`respond()` runs the same turn as /api/chat (`begin` + `stream`: same agent, model and MCP
delegation) and translates its events into ChatKit's: the turn's tokens become text deltas of an
assistant message item whose id is the stored assistant message's id, a tool call shows a progress
update and, once it returns, a completed tool call item (the one a reload of the thread lists), and
a failure becomes a ChatKit error event carrying only our own safe message.

`handle()` wraps `process()` with the checks ChatKitServer would otherwise make mid-stream (where an
exception can only break the connection) or not at all (attachments, unsupported requests).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from chatkit.server import ChatKitServer, NonStreamingResult, StreamingResult
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageContentPartAdded,
    AssistantMessageContentPartDone,
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    AttachmentsCreateReq,
    AttachmentsDeleteReq,
    ChatKitReq,
    InputTranscribeReq,
    ProgressUpdateEvent,
    ThreadItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadsAddClientToolOutputReq,
    ThreadsAddStructuredInputReq,
    ThreadsAddUserMessageReq,
    ThreadsCreateReq,
    ThreadsCustomActionReq,
    ThreadsRetryAfterItemReq,
    ThreadsSyncCustomActionReq,
    ThreadStreamEvent,
    ThreadsUpdateReq,
    UserMessageItem,
)
from chatkit.types import ErrorEvent as ChatKitError
from pydantic import TypeAdapter

from backend.failures import ServiceError, UnsupportedRequest
from backend.models import utcnow
from backend.services.chatkit_store import (
    ChatKitContext,
    ConversationStore,
    attachments_refused,
    clean_title,
    message_text,
    tool_item,
    tool_item_id,
)
from backend.services.turn import TurnService
from backend.services.turn_events import (
    Token,
    ToolCalled,
    ToolReturned,
    TurnCompleted,
    TurnError,
    TurnEvent,
    TurnStarted,
)
from backend.services.turn_store import TurnRequest, title_from

_REQUEST: TypeAdapter[ChatKitReq] = TypeAdapter(ChatKitReq)

_TOOL_PROGRESS = {
    "add_task": "Adding a task",
    "list_tasks": "Looking up your tasks",
    "complete_task": "Completing a task",
    "update_task": "Updating a task",
    "delete_task": "Deleting a task",
}


def error_event(error: ServiceError) -> ChatKitError:
    """A failure as ChatKit shows it: our own message, and whether retrying can help."""
    return ChatKitError(message=error.message, allow_retry=error.retryable)


class TaskChatKitServer(ChatKitServer[ChatKitContext]):
    def __init__(self, store: ConversationStore, turns: TurnService) -> None:
        super().__init__(store)
        self._turns = turns

    async def handle(self, body: bytes, context: ChatKitContext) -> StreamingResult | NonStreamingResult:
        """`process()`, after refusing up front what would otherwise fail inside a stream.

        Raises pydantic's ValidationError (422), chatkit's NotFoundError (404) or a ServiceError.
        """
        request = _REQUEST.validate_json(body)
        match request:
            case ThreadsCreateReq() | ThreadsAddUserMessageReq():
                # Before the user message is shown as sent.
                if request.params.input.attachments:
                    raise attachments_refused()
                if isinstance(request, ThreadsAddUserMessageReq):
                    await self.store.load_thread(request.params.thread_id, context)
            case ThreadsRetryAfterItemReq():
                item = await self.store.load_item(request.params.thread_id, request.params.item_id, context)
                if not isinstance(item, UserMessageItem):
                    raise UnsupportedRequest("Only a user message can be answered again", code="invalid_request")
                context.regenerate = True
            case ThreadsUpdateReq():
                # The SDK answers with the title it was given: give it the one we store.
                request.params.title = clean_title(request.params.title)
                body = request.model_dump_json().encode()
            case AttachmentsCreateReq() | AttachmentsDeleteReq():
                raise attachments_refused()
            case (
                ThreadsAddClientToolOutputReq()
                | ThreadsAddStructuredInputReq()
                | ThreadsCustomActionReq()
                | ThreadsSyncCustomActionReq()
                | InputTranscribeReq()
            ):
                raise UnsupportedRequest(f"{request.type} is not supported by this server")
        if isinstance(request, ThreadsCreateReq | ThreadsAddUserMessageReq):
            _check_text(request)
        return await self.process(body, context)

    async def respond(
        self, thread: ThreadMetadata, input_user_message: UserMessageItem | None, context: ChatKitContext
    ) -> AsyncIterator[ThreadStreamEvent]:
        if input_user_message is None:  # client tool output / structured input: refused in handle()
            yield ChatKitError(message="This server only answers user messages")
            return
        text = message_text(input_user_message)
        if thread.title is None:  # created by this request: titled like a conversation from /api/chat
            thread.title = title_from(text)
        if context.turn is None:  # threads.retry_after_item: answer the stored message again
            try:
                context.turn = await self._turns.begin(
                    TurnRequest(
                        context.user_id,
                        text,
                        conversation_id=uuid.UUID(thread.id),
                        user_message_id=uuid.UUID(input_user_message.id),
                        regenerate=context.regenerate,
                    )
                )
            except ServiceError as error:  # busy, or the thread was deleted meanwhile
                yield error_event(error)
                return
        context.stream = self._turns.stream(context.turn)
        reply = _Reply(thread.id)
        async for event in context.stream:
            for chatkit_event in reply.translate(event):
                yield chatkit_event

    async def handle_stream_cancelled(
        self, thread: ThreadMetadata, pending_items: list[ThreadItem], context: ChatKitContext
    ) -> None:
        # The turn has stored the partial answer as aborted; the SDK's default would store it again
        # plus a hidden note, and our history already leaves aborted replies out.
        return


def _check_text(request: ThreadsCreateReq | ThreadsAddUserMessageReq) -> None:
    """Refuse an empty or oversized message (422) before threads.create makes anything."""
    item = UserMessageItem(
        id="check",
        thread_id="check",
        created_at=utcnow(),
        content=request.params.input.content,
        quoted_text=request.params.input.quoted_text,
        inference_options=request.params.input.inference_options,
    )
    message_text(item)


@dataclass
class _Reply:
    """The ChatKit events of one assistant message, built from the turn's events."""

    thread_id: str
    message_id: str = ""
    item: AssistantMessageItem | None = None
    text: str = ""
    calls: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # call id -> (index, arguments)

    def translate(self, event: TurnEvent | None) -> Iterator[ThreadStreamEvent]:
        if isinstance(event, TurnStarted):
            self.message_id = str(event.message_id)
        elif isinstance(event, ToolCalled):
            # Numbered in call order, as the reply stores them, so a reload shows the same items.
            self.calls[event.call_id] = (len(self.calls), event.arguments)
            yield ProgressUpdateEvent(icon="bolt", text=_TOOL_PROGRESS.get(event.name, f"Using {event.name}"))
        elif isinstance(event, ToolReturned) and event.call_id in self.calls:
            index, arguments = self.calls[event.call_id]
            call = {"name": event.name, "arguments": arguments, "result": event.result}
            item_id = tool_item_id(self.message_id, index)
            yield ThreadItemDoneEvent(item=tool_item(self.thread_id, item_id, utcnow(), call))
        elif isinstance(event, Token):
            yield from self._open()
            self.text += event.token
            yield ThreadItemUpdatedEvent(
                item_id=self.message_id,
                update=AssistantMessageContentPartTextDelta(content_index=0, delta=event.token),
            )
        elif isinstance(event, TurnCompleted):
            self.message_id = str(event.message_id)
            yield from self._close(event.content)
        elif isinstance(event, TurnError):
            # What was said before the failure is stored with the error, so it stays on screen.
            yield from self._close(self.text)
            yield error_event(event.error)
        # Heartbeats (None) add nothing here.

    def _open(self) -> Iterator[ThreadStreamEvent]:
        # The item appears with its first words, so a turn that fails silently leaves no empty bubble.
        if self.item is None:
            self.item = AssistantMessageItem(
                id=self.message_id, thread_id=self.thread_id, created_at=utcnow(), content=[]
            )
            yield ThreadItemAddedEvent(item=self.item)
            yield ThreadItemUpdatedEvent(
                item_id=self.message_id,
                update=AssistantMessageContentPartAdded(content_index=0, content=AssistantMessageContent(text="")),
            )

    def _close(self, text: str) -> Iterator[ThreadStreamEvent]:
        if not text and self.item is None:
            return
        yield from self._open()
        assert self.item is not None
        content = AssistantMessageContent(text=text)
        yield ThreadItemUpdatedEvent(
            item_id=self.message_id, update=AssistantMessageContentPartDone(content_index=0, content=content)
        )
        yield ThreadItemDoneEvent(item=self.item.model_copy(update={"content": [content]}))
