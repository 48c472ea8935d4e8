"""The chat turn: one service behind `/api/chat`, `/api/chat/stream`, `/api/chat/ui` and `/chatkit`.

`begin` runs the first transaction (claim, store the user message, read history; see turn_store).
Then a front door either `run`s the turn for one JSON answer (the model is called without streaming:
nobody reads tokens) or `stream`s it as events. Either way the turn runs under its lease (renewed,
fenced when lost), within `TURN_TIMEOUT_SECONDS`, with a fresh agent whose task tools carry a
delegation token minted for this user and turn, and no database connection is held meanwhile.
However it ends, its reply is stored: `complete`, `error` (the failure is answered too), or
`aborted` when the client went away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

from agents import ItemHelpers, Model, RawResponsesStreamEvent, RunHooks, RunItemStreamEvent, Runner, TResponseInputItem
from agents.items import ModelResponse, ToolCallItem, ToolCallOutputItem
from agents.tool_context import ToolContext
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseTextDeltaEvent,
)
from sqlalchemy.exc import IntegrityError

from backend import metrics
from backend.agent.factory import build_agent, run_config
from backend.agent.failures import classify, describe
from backend.agent.mcp_client import TURN_CALL, TaskServer, TurnCall
from backend.agent.tool_output import parse_tool_output
from backend.config import Settings
from backend.db import Database
from backend.delegation import mint_turn_token
from backend.failures import ConversationBusy, ServiceError
from backend.models import MessageStatus, Role
from backend.request_context import current_request_id
from backend.services import streaming, turn_store
from backend.services.limits import Limits
from backend.services.turn_events import (
    Token,
    ToolCalled,
    ToolReturned,
    TurnCompleted,
    TurnError,
    TurnEvent,
    TurnStarted,
    zero_usage,
)
from backend.services.turn_lease import TurnLease
from backend.services.turn_store import BegunTurn, HistoryMessage, Outcome, TurnPolicy, TurnRequest

log = logging.getLogger(__name__)

# Between assistant messages of one answer (text before a tool call, text after it).
PARAGRAPH = "\n\n"


def history_items(history: list[HistoryMessage]) -> list[TResponseInputItem]:
    """Structured role items: a user's text is always a user item, so no one can forge an assistant turn."""
    return [{"role": "user" if m.role == Role.user else "assistant", "content": m.content} for m in history]


class TurnRecorder(RunHooks[Any]):
    """What a run did, from the SDK's hooks: tool calls with their results, usage, and each model
    response's text. It sees every completed model call and tool call, however the run ends."""

    def __init__(self, model: str = "") -> None:
        self.model = model
        self.calls: dict[str, dict[str, Any]] = {}
        self.usage = zero_usage()
        self.texts: list[str] = []
        self._llm_started: float | None = None

    async def on_llm_start(self, context: Any, agent: Any, system_prompt: Any, input_items: Any) -> None:
        self._llm_started = time.monotonic()

    async def on_llm_end(self, context: Any, agent: Any, response: ModelResponse) -> None:
        if self._llm_started is not None:
            metrics.model_called(self.model, time.monotonic() - self._llm_started)
            self._llm_started = None
        self.usage["input_tokens"] += response.usage.input_tokens
        self.usage["output_tokens"] += response.usage.output_tokens
        self.usage["total_tokens"] += response.usage.total_tokens
        text = "".join(ItemHelpers.extract_text(item) or "" for item in response.output)
        if text:
            self.texts.append(text)

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        if isinstance(context, ToolContext):
            try:
                arguments = json.loads(context.tool_arguments or "{}")
            except ValueError:
                arguments = {"_raw": context.tool_arguments}
            self.calls[context.tool_call_id] = {"name": context.tool_name, "arguments": arguments, "result": None}

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: object) -> None:
        if isinstance(context, ToolContext) and (call := self.calls.get(context.tool_call_id)) is not None:
            call["result"] = parse_tool_output(result)

    def tool_calls(self) -> list[dict[str, Any]]:
        return list(self.calls.values())


@dataclass
class _Run:
    """One attempt at answering: what it produced so far, stored however it ends."""

    turn: BegunTurn
    model: str
    recorder: TurnRecorder = field(init=False)
    streamed_text: list[str] | None = None  # streamed runs: the text as sent, partial answers included
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.recorder = TurnRecorder(self.model)

    @property
    def content(self) -> str:
        if self.streamed_text is not None:
            return "".join(self.streamed_text)
        return PARAGRAPH.join(self.recorder.texts)

    def outcome(self, status: MessageStatus, error_code: str | None = None) -> Outcome:
        return Outcome(
            status=status,
            content=self.content,
            tool_calls=self.recorder.tool_calls(),
            usage=dict(self.recorder.usage),
            model=self.model,
            duration_ms=self.duration_ms,
            error_code=error_code,
        )

    @property
    def duration_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)


Emit = Callable[[TurnEvent], Awaitable[None]]


class TurnService:
    """Process-wide plumbing for turns (no per-user state): the database, the model, the task tools."""

    def __init__(self, db: Database, settings: Settings, model_factory: Callable[[], Model], tools: TaskServer) -> None:
        self.db = db
        self.settings = settings
        self.tools = tools
        self._model_factory = model_factory
        self._model_host = urlsplit(settings.model_api_base).netloc if settings.model_api_base else None
        self._policy = TurnPolicy(
            lease_seconds=settings.turn_lease_seconds,
            history_max_messages=settings.history_max_messages,
            history_max_chars=settings.history_max_chars,
            limits=Limits(settings.user_turns_per_minute, settings.user_tokens_per_day, settings.user_concurrent_turns),
        )

    async def begin(self, request: TurnRequest) -> BegunTurn:
        try:
            try:
                return await self.db.run(lambda c: turn_store.begin_turn(c, request, self._policy))
            except IntegrityError:
                if request.idempotency_key is None:
                    raise
                # The same key's first use raced this one and won: begin again to find what it stored.
                return await self.db.run(lambda c: turn_store.begin_turn(c, request, self._policy))
        except ServiceError as refused:  # busy, over a limit, the database away, ...
            metrics.turn_refused(refused)
            raise

    async def run(self, turn: BegunTurn, request_id: str | None = None) -> TurnCompleted:
        """The whole turn for one JSON answer; raises the turn's ServiceError (its reply is stored).

        `request_id` (default: the current request's) goes with every MCP call of the turn."""
        if turn.replay is not None:
            return _replayed(turn)
        attempt = _Run(turn, self.settings.model_name)
        event = await self._attempt(attempt, request_id or current_request_id(), None)
        if isinstance(event, TurnError):
            raise event.error
        return event

    def stream(self, turn: BegunTurn, request_id: str | None = None) -> TurnStream:
        """The turn as events, for a streaming front door; the front door must `aclose()` it."""
        return TurnStream(self, turn, request_id or current_request_id())

    async def abandon(self, turn: BegunTurn) -> None:
        """A begun turn that will never run (its client left first): store it aborted, free the lease."""
        if turn.replay is None:
            await self._store(_Run(turn, self.settings.model_name), MessageStatus.aborted, "client_disconnected")

    # --- running ---------------------------------------------------------------------------------------

    async def _attempt(self, attempt: _Run, request_id: str | None, emit: Emit | None) -> TurnCompleted | TurnError:
        turn = attempt.turn
        try:
            async with TurnLease(self.db, turn, self.settings.turn_lease_seconds) as lease:
                async with asyncio.timeout(self.settings.turn_timeout_seconds):
                    await self._execute(attempt, request_id, emit)
        except asyncio.CancelledError:
            await self._store(attempt, MessageStatus.aborted, "client_disconnected")
            raise
        except Exception as error:
            failure = classify(error)
            cause = describe(error, self._model_host)
            log.warning("turn failed: %s (%s)", failure.code, cause, exc_info=failure.code == "internal_error")
            return await self._fail(attempt, failure)
        if lease.lost is not None:
            return await self._fail(attempt, lease.lost)
        try:
            stored = await self._store(attempt, MessageStatus.complete)
        except ServiceError as failure:
            return TurnError(_attach(failure, turn), turn.conversation_id, turn.assistant_message_id)
        if not stored:  # the lease was taken over between the run's end and its storing
            return await self._fail(attempt, lease.lost or ConversationBusy())
        recorder = attempt.recorder
        return TurnCompleted(
            turn.conversation_id,
            turn.assistant_message_id,
            attempt.content,
            recorder.tool_calls(),
            dict(recorder.usage),
            attempt.model,
            attempt.duration_ms,
        )

    async def _fail(self, attempt: _Run, failure: ServiceError) -> TurnError:
        turn = attempt.turn
        try:
            await self._store(attempt, MessageStatus.error, failure.code)
        except ServiceError as unstored:
            failure = unstored
        return TurnError(_attach(failure, turn), turn.conversation_id, turn.assistant_message_id)

    async def _execute(self, attempt: _Run, request_id: str | None, emit: Emit | None) -> None:
        settings, turn = self.settings, attempt.turn
        token = mint_turn_token(
            settings.resolved_mcp_secret(),
            turn.user_id,
            conversation_id=turn.conversation_id,
            turn_id=turn.turn_id,
            replay_scope=turn.replay_scope,
            ttl_seconds=settings.mcp_token_ttl_seconds,
        )
        # The task tools read who they act for from here (see mcp_client); the SDK's tasks inherit it.
        call = TURN_CALL.set(TurnCall(token, request_id))
        try:
            await self._run_agent(attempt, emit)
        finally:
            TURN_CALL.reset(call)

    async def _run_agent(self, attempt: _Run, emit: Emit | None) -> None:
        settings = self.settings
        agent = build_agent(settings, self._model_factory(), await self.tools.function_tools())
        items = history_items(attempt.turn.history)
        run = run_config(settings)
        if emit is None:
            await Runner.run(agent, items, max_turns=settings.agent_max_turns, hooks=attempt.recorder, run_config=run)
            return
        text: list[str] = []
        attempt.streamed_text = text
        result = Runner.run_streamed(
            agent, items, max_turns=settings.agent_max_turns, hooks=attempt.recorder, run_config=run
        )
        index, paragraph = 0, False
        async for event in result.stream_events():
            if isinstance(event, RawResponsesStreamEvent):
                data = event.data
                if isinstance(data, ResponseTextDeltaEvent) and data.delta:
                    if paragraph and text:  # a new assistant message after earlier text: keep them apart
                        text.append(PARAGRAPH)
                        await emit(Token(PARAGRAPH, index))
                        index += 1
                    paragraph = False
                    text.append(data.delta)
                    await emit(Token(data.delta, index))
                    index += 1
                elif isinstance(data, ResponseCompletedEvent):
                    paragraph = True
            elif isinstance(event, RunItemStreamEvent):
                if isinstance(event.item, ToolCallItem):
                    raw = _raw(event.item.raw_item)
                    if raw.get("type") == "function_call":
                        arguments = _arguments(raw.get("arguments"))
                        await emit(ToolCalled(str(raw.get("call_id")), str(raw.get("name")), arguments))
                elif isinstance(event.item, ToolCallOutputItem):
                    call_id = str(_raw(event.item.raw_item).get("call_id", ""))
                    call = attempt.recorder.calls.get(call_id)
                    name = call["name"] if call else ""
                    await emit(ToolReturned(call_id, name, parse_tool_output(event.item.output)))

    async def _store(self, attempt: _Run, status: MessageStatus, error_code: str | None = None) -> bool:
        """Store the attempt's reply and release the lease, even while the request is being cancelled."""
        outcome = attempt.outcome(status, error_code)
        turn = attempt.turn
        store = asyncio.ensure_future(self._finish(turn, outcome))
        try:
            stored = await asyncio.shield(store)
        except asyncio.CancelledError:
            await asyncio.shield(store)  # cancelled again while storing: finish storing, then go
            raise
        usage = outcome.usage
        metrics.turn_finished(status.value, error_code, outcome.duration_ms / 1000, outcome.model, usage)
        # One line per turn: enough to follow latency, cost and failures without logging content. The
        # fields are in the text for people and in `extra` for LOG_FORMAT=json. User ids are logged as
        # they are: the identity provider's opaque ids, not secrets, and what a support request quotes.
        fields = {
            "conversation_id": str(turn.conversation_id),
            "message_id": str(turn.assistant_message_id),
            "user_id": turn.user_id,
            "model": outcome.model,
            "outcome": status.value,
            "error_code": error_code,
            "duration_ms": outcome.duration_ms,
            "input_tokens": usage["input_tokens"],
            "output_tokens": usage["output_tokens"],
            "tool_count": len(outcome.tool_calls),
            "stored": stored,
        }
        log.info(
            "turn conversation=%s message=%s user=%s outcome=%s%s model=%s duration_ms=%d tokens_in=%d tokens_out=%d "
            "tools=%d(%s)%s",
            fields["conversation_id"],
            fields["message_id"],
            turn.user_id,
            status.value,
            f" code={error_code}" if error_code else "",
            outcome.model,
            outcome.duration_ms,
            usage["input_tokens"],
            usage["output_tokens"],
            len(outcome.tool_calls),
            ",".join(call["name"] for call in outcome.tool_calls) or "-",
            "" if stored else " (not stored: the lease was taken over)",
            extra=fields,
        )
        return stored

    async def _finish(self, turn: BegunTurn, outcome: Outcome) -> bool:
        try:
            return await self.db.run(lambda c: turn_store.finish_turn(c, turn, outcome))
        except ServiceError:
            raise
        except Exception as error:
            log.exception("could not store the reply of conversation %s", turn.conversation_id)
            raise ServiceError("The reply could not be stored; try again", retryable=True) from error


def _replayed(turn: BegunTurn) -> TurnCompleted:
    reply = turn.replay
    assert reply is not None
    return TurnCompleted(
        turn.conversation_id,
        reply.message_id,
        reply.content,
        reply.tool_calls,
        reply.usage or zero_usage(),
        reply.model or "",
        reply.duration_ms or 0,
    )


def _attach(failure: ServiceError, turn: BegunTurn) -> ServiceError:
    failure.turn = (turn.conversation_id, turn.assistant_message_id)
    return failure


def _raw(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    dump = getattr(item, "model_dump", None)
    return dump() if callable(dump) else {}


def _arguments(raw: Any) -> dict[str, Any]:
    try:
        parsed = json.loads(raw or "{}")
    except ValueError:
        return {"_raw": raw}
    return parsed if isinstance(parsed, dict) else {"_raw": raw}


class TurnStream:
    """A running turn's events for a streaming front door: `TurnEvent`s, and None when a heartbeat is
    due (the model has been silent for `SSE_HEARTBEAT_SECONDS`).

    The turn runs in a task of its own feeding a bounded queue (see streaming.py). `aclose()` ends
    it, and a front door must call it however the response ends: a turn that never started is
    stored as aborted and its lease freed at once; a running one is cancelled and stores its partial
    answer as aborted.
    """

    def __init__(self, service: TurnService, turn: BegunTurn, request_id: str | None) -> None:
        self._service = service
        self.turn = turn
        self._request_id = request_id
        self._queue: asyncio.Queue[object] = asyncio.Queue(streaming.BUFFER)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[TurnEvent | None]:
        turn = self.turn
        yield TurnStarted(turn.conversation_id, turn.assistant_message_id)
        if turn.replay is not None:
            self._closed = True
            yield _replayed(turn)
            return
        self._task = asyncio.create_task(self._produce())
        try:
            async for item in streaming.drain(self._queue, self._task, self._service.settings.sse_heartbeat_seconds):
                yield cast(TurnEvent | None, item)
        finally:
            await self.aclose()

    async def _produce(self) -> None:
        attempt = _Run(self.turn, self._service.settings.model_name)
        await self._queue.put(await self._service._attempt(attempt, self._request_id, self._queue.put))
        await self._queue.put(streaming.END)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is None:
            await self._service.abandon(self.turn)
        else:
            await streaming.stop(self._task)
