"""The Vercel AI SDK's UI message stream protocol, spoken by `POST /api/chat/ui`.

A Next.js app's `useChat` with the stock `DefaultChatTransport` POSTs `{id, messages, trigger,
messageId}` and reads the "UI message stream" (SSE `data: {json}` parts ending in `data: [DONE]`,
marked by the `x-vercel-ai-ui-message-stream: v1` header). This module is the translation both
ways, so the turn service stays protocol-free and the AI SDK needs no adapter:

- in: the chat `id` names a conversation of this user, the newest user message is the only thing
  read (history is the database's), its `id` is the idempotency key, and `regenerate-message`
  answers that message again;
- out: turn events become parts (`start`, `text-*`, dynamic tool parts, `finish`, `error`).

Our tools run on the server, so tool parts are `dynamic` (the client has no schema for them) and
`providerExecuted` (the AI SDK then never offers them to `onToolCall` nor resubmits for them).
Heartbeats are SSE comments here: the AI SDK's parser (eventsource-parser) drops comments, while an
unknown part type such as `{"type":"heartbeat"}` fails its schema and ends the stream with an error.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from backend.api.sse import frame
from backend.failures import InvalidInput
from backend.models import ClientMessageId, MessageText
from backend.services.chatkit_store import attachments_refused
from backend.services.turn import PARAGRAPH, TurnStream
from backend.services.turn_events import (
    Token,
    ToolCalled,
    ToolReturned,
    TurnCompleted,
    TurnError,
    TurnEvent,
    TurnStarted,
)
from backend.services.turn_store import TurnRequest

log = logging.getLogger(__name__)

HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
HEARTBEAT = b": heartbeat\n\n"
DONE = frame("[DONE]")

# Chat ids that are not UUIDs (the AI SDK's default ids are 16-character nanoids) name the
# conversation uuid5(CHAT_IDS, "<user>\n<chat id>"): stable for one user, never shared between users.
CHAT_IDS = uuid.UUID("6f1d8a52-3c0e-4d63-9a57-0b8f2e6c4d11")


# --- in: DefaultChatTransport's body -------------------------------------------------------------------


class UIPart(BaseModel):
    """One part of a UIMessage; only `text` parts are read, the rest are the client's own record."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class UIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: ClientMessageId
    role: Literal["system", "user", "assistant"]
    parts: list[UIPart]


class UIChatRequest(BaseModel):
    """What `DefaultChatTransport` sends; fields an app adds with the transport's `body` are ignored."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=200, description="The chat id: a conversation id, or any id of yours")
    messages: list[UIMessage] = Field(min_length=1, description="The client's messages; only the newest is read")
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = Field(default=None, description="The assistant message to regenerate (not needed)")


_TEXT: TypeAdapter[str] = TypeAdapter(MessageText)


def conversation_id(chat_id: str, user_id: str) -> uuid.UUID:
    """A UUID chat id is the conversation id (so `useChat({ id })` opens a REST or ChatKit
    conversation); any other id maps to a conversation of this user alone."""
    try:
        return uuid.UUID(chat_id)
    except ValueError:
        return uuid.uuid5(CHAT_IDS, f"{user_id}\n{chat_id}")


def turn_request(body: UIChatRequest, user_id: str) -> TurnRequest:
    """The newest message, which must be the user's, as a turn; raises InvalidInput or UnsupportedRequest."""
    newest = body.messages[-1]
    where = ("body", "messages")
    if newest.role != "user":
        raise InvalidInput("The newest message must be a user message", field=where)
    if any(part.type == "file" for part in newest.parts):
        raise attachments_refused()
    text = "\n\n".join(part.text for part in newest.parts if part.type == "text" and part.text is not None)
    try:
        message = _TEXT.validate_python(text)
    except ValidationError as error:
        raise InvalidInput(f"The newest message's text: {error.errors()[0]['msg']}", field=where) from None
    return TurnRequest(
        user_id,
        message,
        conversation_id(body.id, user_id),
        idempotency_key=newest.id,
        regenerate=body.trigger == "regenerate-message",
        create_if_missing=True,
    )


# --- out: turn events as UI message stream parts --------------------------------------------------------


def part(chunk: dict[str, Any]) -> bytes:
    return frame(json.dumps(chunk, separators=(",", ":"), default=str))


class UIMessageParts:
    """The parts of one assistant message, from the turn's events: text parts open with the first
    token after a tool call and close before the next one, as the AI SDK's own server does."""

    def __init__(self) -> None:
        self.message_id = ""
        self.conversation_id = ""
        self._text_parts = 0
        self._open: str | None = None  # the id of the text part being written
        self._streamed = False  # tokens or tool calls went out (a replayed answer has none)

    def translate(self, event: TurnEvent) -> Iterator[dict[str, Any]]:
        match event:
            case TurnStarted():
                self.message_id, self.conversation_id = str(event.message_id), str(event.conversation_id)
                yield {"type": "start", "messageId": self.message_id, "messageMetadata": self._metadata()}
            case Token():
                self._streamed = True
                if self._open is None and self._text_parts and event.token == PARAGRAPH:
                    return  # the turn's separator between messages: here the parts themselves separate them
                yield from self._text(event.token)
            case ToolCalled():
                self._streamed = True
                yield from self._close()
                yield self._tool_input(event.call_id, event.name, event.arguments)
            case ToolReturned():
                yield self._tool_output(event.call_id, event.result)
            case TurnCompleted():
                if not self._streamed:  # a repeated message id: the stored answer, whole
                    for n, call in enumerate(event.tool_calls):
                        call_id = f"{event.message_id}-{n}"
                        yield self._tool_input(call_id, call.get("name", ""), call.get("arguments", {}))
                        yield self._tool_output(call_id, call.get("result"))
                    if event.content:
                        yield from self._text(event.content)
                yield from self._close()
                usage = {"usage": event.usage, "model": event.model, "durationMs": event.duration_ms}
                yield {"type": "finish", "finishReason": "stop", "messageMetadata": self._metadata(**usage)}
            case TurnError():
                yield from self._close()
                yield self.error(event.error.message, event.error.code, event.error.retryable)

    def _metadata(self, **more: Any) -> dict[str, Any]:
        return {"conversationId": self.conversation_id, "messageId": self.message_id, **more}

    def _text(self, delta: str) -> Iterator[dict[str, Any]]:
        if self._open is None:
            self._text_parts += 1
            self._open = f"{self.message_id}-text-{self._text_parts}"
            yield {"type": "text-start", "id": self._open}
        yield {"type": "text-delta", "id": self._open, "delta": delta}

    def _close(self) -> Iterator[dict[str, Any]]:
        if self._open is not None:
            yield {"type": "text-end", "id": self._open}
            self._open = None

    @staticmethod
    def _tool_input(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
        return {
            "type": "tool-input-available",
            "toolCallId": call_id,
            "toolName": name,
            "input": arguments,
            "dynamic": True,
            "providerExecuted": True,
        }

    @staticmethod
    def _tool_output(call_id: str, result: Any) -> dict[str, Any]:
        return {
            "type": "tool-output-available",
            "toolCallId": call_id,
            "output": result,
            "dynamic": True,
            "providerExecuted": True,
        }

    @staticmethod
    def error(message: str, code: str, retryable: bool) -> dict[str, Any]:
        # `errorText` is what the AI SDK reads; `code` and `retryable` are there for anyone else.
        return {"type": "error", "errorText": message, "code": code, "retryable": retryable}


async def ui_message_stream(stream: TurnStream) -> AsyncIterator[bytes]:
    """The turn's parts as SSE, a comment while the model is silent, always ending `[DONE]`."""
    parts = UIMessageParts()
    try:
        async for event in stream:
            if event is None:
                yield HEARTBEAT
                continue
            for chunk in parts.translate(event):
                yield part(chunk)
    except Exception:
        # Failures of the turn itself arrive as TurnError; this is anything else, after the 200.
        log.exception("UI message stream failed")
        yield part(UIMessageParts.error("The request could not be completed", "internal_error", True))
    yield DONE
