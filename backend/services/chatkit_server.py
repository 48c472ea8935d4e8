"""The ChatKit front door of the one turn service.

`respond()` runs the same turn as /api/chat (`begin` + `run_turn`: same agent, model and MCP
delegation) and translates its events into ChatKit's: the turn's tokens become text deltas of an
assistant message item whose id is the stored assistant message's id, tool calls become progress
updates, and a failure becomes a ChatKit error event carrying only our own safe message.

`handle()` wraps `process()` with the checks ChatKitServer would otherwise make mid-stream (where an
exception can only break the connection) or not at all (attachments, unsupported requests).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

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
    UserMessageContent,
    UserMessageItem,
)
from chatkit.types import ErrorEvent as ChatKitError
from pydantic import TypeAdapter

from backend.errors import ApiError
from backend.models import MessageText, utcnow
from backend.services.chatkit_store import ChatKitContext, ConversationStore, attachments_refused, clean_title
from backend.services.streaming import with_heartbeats
from backend.services.turn import (
    CompleteEvent,
    StartEvent,
    TokenEvent,
    ToolCallEvent,
    TurnEvent,
    TurnInput,
    begin,
    run_turn,
)
from backend.services.turn import ErrorEvent as TurnError
from backend.services.turn_store import title_from

_REQUEST: TypeAdapter[ChatKitReq] = TypeAdapter(ChatKitReq)
_MESSAGE: TypeAdapter[str] = TypeAdapter(MessageText)

_TOOL_PROGRESS = {
    "add_task": "Adding a task",
    "list_tasks": "Looking up your tasks",
    "complete_task": "Completing a task",
    "update_task": "Updating a task",
    "delete_task": "Deleting a task",
}


def message_text(content: list[UserMessageContent], quoted_text: str | None) -> str:
    """The text the turn stores and the model reads; raises ValidationError like /api/chat's 422."""
    text = "".join(part.text for part in content)
    if quoted_text:
        text = f"> {quoted_text}\n\n{text}"
    return _MESSAGE.validate_python(text)


class TaskChatKitServer(ChatKitServer[ChatKitContext]):
    def __init__(self) -> None:
        super().__init__(ConversationStore())

    async def handle(self, body: bytes, context: ChatKitContext) -> StreamingResult | NonStreamingResult:
        """`process()`, after refusing up front what would otherwise fail inside a stream.

        Raises pydantic's ValidationError (422), chatkit's NotFoundError (404) or ApiError.
        """
        request = _REQUEST.validate_json(body)
        match request:
            case ThreadsCreateReq():
                self._check_input(request)
            case ThreadsAddUserMessageReq():
                self._check_input(request)
                await self.store.load_thread(request.params.thread_id, context)
            case ThreadsRetryAfterItemReq():
                item = await self.store.load_item(request.params.thread_id, request.params.item_id, context)
                if not isinstance(item, UserMessageItem):
                    raise ApiError(400, "invalid_request", "Only a user message can be answered again")
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
                raise ApiError(400, "unsupported_request", f"{request.type} is not supported by this server")
        return await self.process(body, context)

    @staticmethod
    def _check_input(request: ThreadsCreateReq | ThreadsAddUserMessageReq) -> None:
        # Before threads.create inserts a conversation or the user message is shown as sent.
        if request.params.input.attachments:
            raise attachments_refused()
        message_text(request.params.input.content, request.params.input.quoted_text)

    async def respond(
        self, thread: ThreadMetadata, input_user_message: UserMessageItem | None, context: ChatKitContext
    ) -> AsyncIterator[ThreadStreamEvent]:
        if input_user_message is None:  # client tool output / structured input: refused in handle()
            yield ChatKitError(message="This server only answers user messages")
            return
        text = message_text(input_user_message.content, input_user_message.quoted_text)
        if thread.title is None:  # created by this request: titled like a conversation from /api/chat
            thread.title = title_from(text)
        deps, user_id = context.deps, context.user_id
        try:
            # Stores the user message under the item's id, or finds it again on threads.retry_after_item.
            turn = await begin(
                deps,
                TurnInput(
                    user_id,
                    text,
                    conversation_id=uuid.UUID(thread.id),
                    user_message_id=uuid.UUID(input_user_message.id),
                ),
            )
        except ApiError as exc:  # 409 busy, or 404 if the thread was deleted meanwhile
            yield ChatKitError(message=exc.detail, allow_retry=bool(exc.retryable))
            return
        # The turn runs in a task of its own (its MCP connection opens and closes there); if this
        # generator is abandoned (client gone), the task is cancelled and stores an aborted reply.
        events = with_heartbeats(lambda: run_turn(deps, user_id, turn), deps.settings.sse_heartbeat_seconds)
        reply = _Reply(thread.id)
        async for event in events:
            for chatkit_event in reply.translate(event):
                yield chatkit_event

    async def handle_stream_cancelled(
        self, thread: ThreadMetadata, pending_items: list[ThreadItem], context: ChatKitContext
    ) -> None:
        # run_turn has stored the partial answer as aborted; the SDK's default would store it again
        # plus a hidden note, and our history already leaves aborted replies out.
        return


@dataclass
class _Reply:
    """The ChatKit events of one assistant message, built from the turn's events."""

    thread_id: str
    message_id: str = ""
    item: AssistantMessageItem | None = None
    text: str = ""

    def translate(self, event: TurnEvent | None) -> Iterator[ThreadStreamEvent]:
        if isinstance(event, StartEvent):
            self.message_id = event.message_id
        elif isinstance(event, ToolCallEvent):
            yield ProgressUpdateEvent(icon="bolt", text=_TOOL_PROGRESS.get(event.name, f"Using {event.name}"))
        elif isinstance(event, TokenEvent):
            yield from self._open()
            self.text += event.token
            yield ThreadItemUpdatedEvent(
                item_id=self.message_id,
                update=AssistantMessageContentPartTextDelta(content_index=0, delta=event.token),
            )
        elif isinstance(event, CompleteEvent):
            self.message_id = event.message_id
            yield from self._close(event.full_content)
        elif isinstance(event, TurnError):
            # What was said before the failure is stored with the error, so it stays on screen.
            yield from self._close(self.text)
            yield ChatKitError(message=event.message, allow_retry=event.retryable)
        # Heartbeats (None) and tool results (the answer reports them) add nothing here.

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
