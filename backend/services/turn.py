"""The chat turn: one service behind `/api/chat`, `/api/chat/stream` and `/chatkit`.

`run_turn` is an async generator of `TurnEvent`s. The front doors differ only in how they deliver
those events (one JSON body, our SSE events, ChatKit events). Steps (DESIGN.md, "A chat turn"):

1. `begin_turn`: claim the conversation (409 if a turn runs), store the user message, read history.
2. Build a fresh agent with the model and the MCP server carrying a per-turn delegation token.
3. Run it streamed, with no database session held, renewing the lease meanwhile.
4. `finish_turn`: store the assistant message: complete, error (with a contract error), or aborted
   when the client went away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anyio
import httpx2
import openai
from agents import (
    MaxTurnsExceeded,
    Model,
    ModelBehaviorError,
    RawResponsesStreamEvent,
    RunItemStreamEvent,
    Runner,
    TResponseInputItem,
)
from agents.exceptions import ModelTimeoutError
from agents.items import ToolCallItem, ToolCallOutputItem
from mcp.shared.exceptions import MCPError
from openai.types.responses import ResponseTextDeltaEvent
from sqlalchemy import Engine

from backend.agent.factory import McpUnavailable, build_agent, make_mcp_server, make_model
from backend.agent.tool_output import parse_tool_output
from backend.config import Settings
from backend.delegation import mint_turn_token
from backend.models import MessageStatus, Role
from backend.services import turn_store
from backend.services.turn_store import BegunTurn, HistoryMessage

log = logging.getLogger(__name__)


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartEvent:
    conversation_id: str
    message_id: str
    type: Literal["start"] = "start"


@dataclass(frozen=True)
class TokenEvent:
    token: str
    index: int
    type: Literal["token"] = "token"


@dataclass(frozen=True)
class ToolCallEvent:
    call_id: str
    name: str
    arguments: dict[str, Any]
    type: Literal["tool_call"] = "tool_call"


@dataclass(frozen=True)
class ToolResultEvent:
    call_id: str
    name: str
    result: Any
    type: Literal["tool_result"] = "tool_result"


@dataclass(frozen=True)
class CompleteEvent:
    conversation_id: str
    message_id: str
    full_content: str
    tool_calls: list[dict[str, Any]]
    usage: dict[str, int]
    model: str
    duration_ms: int
    type: Literal["complete"] = "complete"


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str
    retryable: bool
    status_code: int
    conversation_id: str
    message_id: str
    type: Literal["error"] = "error"

    def public(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message, "retryable": self.retryable}


TurnEvent = StartEvent | TokenEvent | ToolCallEvent | ToolResultEvent | CompleteEvent | ErrorEvent


def event_dict(event: TurnEvent) -> dict[str, Any]:
    return event.public() if isinstance(event, ErrorEvent) else asdict(event)


# --- failures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    status_code: int
    code: str
    message: str
    retryable: bool


def classify(exc: BaseException) -> Failure:
    """Map an exception from the run to the contract's answer. Upstream text never reaches clients."""
    # LiteLLM wraps errors raised while streaming (MidStreamFallbackError); judge the original.
    original = getattr(exc, "original_exception", None)
    if isinstance(original, BaseException) and original is not exc:
        return classify(original)
    if any(isinstance(cause, McpUnavailable | MCPError) for cause in _causes(exc)):
        return Failure(503, "mcp_unavailable", "The task service is unavailable; try again shortly", True)
    if isinstance(exc, TimeoutError | ModelTimeoutError | openai.APITimeoutError):
        return Failure(504, "model_timeout", "The model took too long to answer; try again", True)
    if isinstance(exc, MaxTurnsExceeded):
        return Failure(502, "max_turns_exceeded", "The assistant needed too many steps for this request", False)
    if isinstance(exc, openai.RateLimitError):
        return Failure(502, "model_rate_limited", "The model provider is rate limiting requests; try again", True)
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return Failure(502, "model_auth_failed", "The model provider rejected the server's credentials", False)
    if isinstance(exc, openai.APIConnectionError):
        return Failure(502, "model_unavailable", "The model provider could not be reached; try again", True)
    if isinstance(exc, openai.APIStatusError):
        retryable = exc.status_code >= 500
        return Failure(502, "model_error", "The model provider returned an error", retryable)
    if isinstance(exc, ModelBehaviorError):
        return Failure(502, "model_error", "The model produced an invalid response", True)
    return Failure(502, "model_error", "The assistant failed to answer", True)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# --- the turn -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnDeps:
    """Process-wide plumbing a turn needs (no per-user state)."""

    engine: Engine
    settings: Settings
    model_factory: Callable[[], Model]

    @classmethod
    def create(cls, engine: Engine, settings: Settings, model_factory: Callable[[], Model] | None = None) -> TurnDeps:
        return cls(engine, settings, model_factory or (lambda: make_model(settings)))


@dataclass
class TurnInput:
    user_id: str
    message: str
    conversation_id: uuid.UUID | None = None
    client_message_id: str | None = None
    # Set by ChatKit, which names the user message item before the turn stores it.
    user_message_id: uuid.UUID | None = None


@dataclass
class _Progress:
    """What the run produced so far; stored whatever way the turn ends."""

    text: list[str] = field(default_factory=list)
    tool_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0})

    @property
    def content(self) -> str:
        return "".join(self.text)

    def calls(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in call.items() if k != "call_id"} for call in self.tool_calls.values()]


def history_items(history: list[HistoryMessage]) -> list[TResponseInputItem]:
    """Structured role items: a user's text is always a user item, so no one can forge an assistant turn."""
    return [{"role": "user" if m.role == Role.user else "assistant", "content": m.content} for m in history]


async def begin(deps: TurnDeps, request: TurnInput) -> BegunTurn:
    settings = deps.settings
    return await anyio.to_thread.run_sync(
        lambda: turn_store.begin_turn(
            deps.engine,
            user_id=request.user_id,
            message=request.message,
            conversation_id=request.conversation_id,
            client_message_id=request.client_message_id,
            lease_seconds=settings.turn_lease_seconds,
            history_max_messages=settings.history_max_messages,
            history_max_chars=settings.history_max_chars,
            user_message_id=request.user_message_id,
        )
    )


async def run_turn(deps: TurnDeps, user_id: str, turn: BegunTurn) -> AsyncIterator[TurnEvent]:
    """Run a begun turn and yield its events; the last one is `complete` or `error`.

    If the consumer stops iterating (client gone), the partial answer is stored as `aborted`.
    """
    conversation_id, message_id = str(turn.conversation_id), str(turn.assistant_message_id)
    yield StartEvent(conversation_id, message_id)
    if turn.replay is not None:
        reply = turn.replay
        yield CompleteEvent(
            conversation_id,
            str(reply.message_id),
            reply.content,
            reply.tool_calls,
            reply.usage or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
            reply.model or "",
            reply.duration_ms or 0,
        )
        return

    engine, settings = deps.engine, deps.settings
    model_name = settings.model_name
    progress = _Progress()
    started = time.monotonic()
    finished = False

    async def store(status: MessageStatus, error_code: str | None = None) -> None:
        nonlocal finished
        finished = True
        duration = int((time.monotonic() - started) * 1000)
        # Shielded: the store must happen even while the request is being cancelled.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                lambda: turn_store.finish_turn(
                    engine,
                    turn,
                    content=progress.content,
                    status=status,
                    tool_calls=progress.calls(),
                    usage=progress.usage,
                    model=model_name,
                    duration_ms=duration,
                    error_code=error_code,
                )
            )
        # One line per turn: enough to follow latency, cost and failures without logging content.
        log.info(
            "turn conversation=%s message=%s status=%s%s model=%s duration_ms=%d tokens=%d tools=%s",
            conversation_id,
            message_id,
            status.value,
            f" code={error_code}" if error_code else "",
            model_name,
            duration,
            progress.usage["total_tokens"],
            ",".join(call["name"] for call in progress.calls()) or "-",
        )

    renewer = asyncio.create_task(_renew_lease(engine, settings, turn))
    try:
        async with asyncio.timeout(settings.turn_timeout_seconds):
            async for event in _run_agent(deps, user_id, turn, progress):
                yield event
        await store(MessageStatus.complete)
        yield CompleteEvent(
            conversation_id,
            message_id,
            progress.content,
            progress.calls(),
            progress.usage,
            model_name,
            int((time.monotonic() - started) * 1000),
        )
    except (asyncio.CancelledError, GeneratorExit):
        if not finished:
            await store(MessageStatus.aborted, "client_disconnected")
        raise
    except Exception as exc:
        failure = classify(exc)
        log.warning("turn failed: %s (%s)", failure.code, type(exc).__name__, exc_info=failure.code == "model_error")
        await store(MessageStatus.error, failure.code)
        yield ErrorEvent(
            failure.code, failure.message, failure.retryable, failure.status_code, conversation_id, message_id
        )
    finally:
        renewer.cancel()


async def _renew_lease(engine: Engine, settings: Settings, turn: BegunTurn) -> None:
    interval = settings.turn_lease_seconds / 3
    while True:
        await asyncio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(
                lambda: turn_store.renew_lease(engine, turn.conversation_id, turn.turn_id, settings.turn_lease_seconds)
            )
        except Exception:
            log.warning("could not renew the turn lease of %s", turn.conversation_id, exc_info=True)


async def _run_agent(deps: TurnDeps, user_id: str, turn: BegunTurn, progress: _Progress) -> AsyncIterator[TurnEvent]:
    settings = deps.settings
    token = mint_turn_token(
        settings.resolved_mcp_secret(),
        user_id,
        conversation_id=turn.conversation_id,
        turn_id=turn.turn_id,  # the MCP server honours the token only while this turn holds the lease
        replay_scope=str(turn.user_message_id),  # the same for every re-run of this turn
        ttl_seconds=settings.mcp_token_ttl_seconds,
    )
    mcp_server = make_mcp_server(settings, token)
    try:
        await mcp_server.connect()  # type: ignore[no-untyped-call]
    except Exception as exc:
        await mcp_server.cleanup()  # type: ignore[no-untyped-call]
        raise McpUnavailable from exc
    try:
        agent = build_agent(settings, deps.model_factory(), mcp_server)
        result = Runner.run_streamed(agent, input=history_items(turn.history), max_turns=settings.agent_max_turns)
        index = 0
        async for event in result.stream_events():
            if isinstance(event, RawResponsesStreamEvent) and isinstance(event.data, ResponseTextDeltaEvent):
                if event.data.delta:
                    progress.text.append(event.data.delta)
                    yield TokenEvent(event.data.delta, index)
                    index += 1
            elif isinstance(event, RunItemStreamEvent) and isinstance(event.item, ToolCallItem):
                call = _tool_call(event.item)
                if call is not None:
                    progress.tool_calls[call["call_id"]] = call
                    yield ToolCallEvent(call["call_id"], call["name"], call["arguments"])
            elif isinstance(event, RunItemStreamEvent) and isinstance(event.item, ToolCallOutputItem):
                call_id = str(_raw(event.item.raw_item).get("call_id", ""))
                entry = progress.tool_calls.get(call_id)
                result_value = parse_tool_output(event.item.output)
                if entry is not None:
                    entry["result"] = result_value
                yield ToolResultEvent(call_id, entry["name"] if entry else "", result_value)
        usage = result.context_wrapper.usage
        progress.usage = {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        }
        if not progress.text and isinstance(result.final_output, str):
            progress.text.append(result.final_output)
    except httpx2.HTTPError as exc:  # the MCP client's transport (LiteLLM never raises httpx2 errors)
        raise McpUnavailable from exc
    finally:
        with anyio.CancelScope(shield=True):
            await mcp_server.cleanup()  # type: ignore[no-untyped-call]


def _raw(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    dump = getattr(item, "model_dump", None)
    return dump() if callable(dump) else {}


def _tool_call(item: ToolCallItem) -> dict[str, Any] | None:
    raw = _raw(item.raw_item)
    if raw.get("type") != "function_call":
        return None
    try:
        arguments = json.loads(raw.get("arguments") or "{}")
    except ValueError:
        arguments = {"_raw": raw.get("arguments")}
    return {"call_id": str(raw.get("call_id")), "name": str(raw.get("name")), "arguments": arguments, "result": None}
