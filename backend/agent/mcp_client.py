"""The MCP task server as the API process sees it: one HTTP client and one tool list per process.

The Agents SDK's own streamable-HTTP server object owns one connection per `connect()`: per turn
that was a new TCP connection, an `initialize`, a `tools/list` and a new HTTP client, the largest
part of a turn's own cost. Our MCP server is stateless (every request is an independent POST), so
`TaskServer` is a process-wide `agents.mcp.MCPServer` instead: tools are listed once (and again only
after a transport failure), and each `tools/call` is one JSON-RPC POST over a shared connection pool
(see `_call`). Listing goes through the official client (`mcp.ClientSession`), in a session of its
own so one failed request cannot take others down.

Who a call acts for is per turn, never per process: the turn sets `TURN_CALL` (its delegation token,
its request id) before it runs, the SDK runs the tools in tasks that inherit it, and `_TurnAuth`
puts it on each request. `tool_meta_resolver` numbers identical calls within the run (the MCP
server's replay key for a recovered turn).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import anyio
import httpx2
import mcp_types
from agents import RunContextWrapper, Tool
from agents.agent import AgentBase
from agents.mcp import MCPServer
from agents.mcp.util import MCPToolMetaContext, MCPUtil
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER

from backend import metrics
from backend.config import Settings
from backend.delegation import CALL_META, mint_turn_token
from backend.failures import McpUnavailable

log = logging.getLogger(__name__)


@dataclass
class TurnCall:
    """What every MCP request of one turn carries: who it acts for, and which request caused it."""

    token: str
    request_id: str | None = None
    occurrences: Counter[str] = field(default_factory=Counter)


TURN_CALL: ContextVar[TurnCall | None] = ContextVar("mcp_turn_call", default=None)


class _TurnAuth(httpx2.Auth):
    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        call = TURN_CALL.get()
        if call is not None:
            request.headers["Authorization"] = f"Bearer {call.token}"
            if call.request_id:
                request.headers["X-Request-ID"] = call.request_id
        yield request


@cache
def _ssl_context() -> ssl.SSLContext:
    # One context for the process: building one per client costs ~20 ms of CPU.
    return ssl.create_default_context()


def call_meta(context: MCPToolMetaContext) -> dict[str, Any]:
    """`_meta` of a tool call: its occurrence among identical calls of this run (see the MCP replay key)."""
    call = TURN_CALL.get()
    if call is None:
        return {}
    signature = json.dumps([context.tool_name, context.arguments], sort_keys=True, default=str)
    occurrence = call.occurrences[signature]
    call.occurrences[signature] += 1
    return {CALL_META: occurrence}


def _answer(response: httpx2.Response) -> Any:
    """The JSON-RPC answer in a POST's body: JSON, or the first `data:` message of an event stream
    that carries a result or an error (notifications may come before it)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for event in response.text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n"):
            data = "\n".join(line[5:].removeprefix(" ") for line in event.splitlines() if line.startswith("data:"))
            if data and isinstance(message := json.loads(data), dict) and ("result" in message or "error" in message):
                return message
        raise ValueError("no answer in the event stream")
    return response.json()


_POST_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}

# Start-up does not wait longer than this for the MCP server.
PREFETCH_SECONDS = 2.0


class TaskServer(MCPServer):
    """The task tools for every turn of this process; each call acts for the turn that makes it."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            use_structured_content=True,
            # A transport failure (the server went away) fails the turn with 503 instead of becoming a
            # tool message the model would apologise for; tool *errors* ("task 7 not found") still reach it.
            failure_error_function=None,
            tool_meta_resolver=call_meta,
        )
        self._url = settings.mcp_url
        self._timeout = settings.mcp_timeout_seconds
        self._http = httpx2.AsyncClient(
            auth=_TurnAuth(),
            timeout=settings.mcp_timeout_seconds,
            verify=_ssl_context(),
            follow_redirects=False,
            limits=httpx2.Limits(max_connections=200, max_keepalive_connections=50, keepalive_expiry=30),
        )
        self._tools: list[mcp_types.Tool] | None = None
        self._protocol_version = mcp_types.LATEST_PROTOCOL_VERSION  # what the server agreed to when listing
        self._listing = asyncio.Lock()
        # The SDK's tools made from `_tools`, built once per listing rather than on every run: they
        # hold no user or turn (each call reads TURN_CALL), so every turn's agent can share them.
        self._function_tools: tuple[list[mcp_types.Tool], list[Tool]] | None = None

    @property
    def name(self) -> str:
        return "tasks"

    async def connect(self) -> None:
        """Nothing per run: the process-wide client is always ready."""

    async def cleanup(self) -> None:
        """Nothing per run; `aclose` ends the process-wide client."""

    async def aclose(self) -> None:
        await self._http.aclose()

    async def list_tools(
        self, run_context: RunContextWrapper[Any] | None = None, agent: AgentBase | None = None
    ) -> list[mcp_types.Tool]:
        if self._tools is None:
            async with self._listing:
                if self._tools is None:
                    self._tools = await self._request(self._list)
        return list(self._tools)

    @property
    def cached_tools(self) -> list[mcp_types.Tool] | None:
        return self._tools

    async def prefetch(self, secret: str) -> None:
        """List and convert the tools at start-up rather than in the first turn. The listing carries a
        grant for no real turn (a nil conversation and turn): it can list, and every tool call made
        with it would be refused. A server that is not up yet is listed on the first turn instead."""
        nil = uuid.UUID(int=0)
        token = mint_turn_token(
            secret, "start-up", conversation_id=nil, turn_id=nil, replay_scope="start-up", ttl_seconds=30
        )
        call = TURN_CALL.set(TurnCall(token))
        try:
            async with asyncio.timeout(PREFETCH_SECONDS):
                await self.function_tools()
        except (McpUnavailable, TimeoutError):
            log.info("task tools not listed at start-up (MCP server not reachable yet); the first turn lists them")
        finally:
            TURN_CALL.reset(call)

    async def function_tools(self) -> list[Tool]:
        """The task tools as the Agents SDK's tools (what `Agent(mcp_servers=[self])` would convert
        on every run), listed and converted once; again after a transport failure drops the listing."""
        await self.list_tools()
        listed = self._tools
        if listed is None:  # dropped by a concurrent failure: convert this listing anyway
            listed = await self.list_tools()
        if self._function_tools is None or self._function_tools[0] is not listed:
            converted: list[Tool] = [
                MCPUtil.to_function_tool(tool, self, convert_schemas_to_strict=False) for tool in listed
            ]
            self._function_tools = (listed, converted)
        return self._function_tools[1]

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None = None
    ) -> mcp_types.CallToolResult:
        request = mcp_types.CallToolRequest(
            params=mcp_types.CallToolRequestParams(name=tool_name, arguments=arguments, _meta=meta)
        )
        try:
            result = await self._call(request)
        except McpUnavailable:
            metrics.tool_called(tool_name, "unavailable")
            raise
        metrics.tool_called(tool_name, "error" if result.is_error else "ok")
        return result

    async def _call(self, request: mcp_types.CallToolRequest) -> mcp_types.CallToolResult:
        """`tools/call` as one POST on the shared pool, its answer read here. Our server is stateless and
        answers each POST in its body (JSON, or an event stream from other servers), so the official
        client's per-call session (two task groups, memory streams, a writer task: most of a tool
        call's cost in the API) adds nothing."""
        body = {"jsonrpc": "2.0", "id": 1, **request.model_dump(by_alias=True, mode="json", exclude_none=True)}
        headers = {**_POST_HEADERS, MCP_PROTOCOL_VERSION_HEADER: self._protocol_version}
        try:
            response = await self._http.post(self._url, json=body, headers=headers)
        except (httpx2.HTTPError, OSError) as error:
            raise self._unavailable(type(error).__name__) from error
        if response.status_code != 200:
            raise self._unavailable(f"status {response.status_code}")
        try:
            return mcp_types.CallToolResult.model_validate(_answer(response)["result"])
        except (ValueError, KeyError, TypeError) as error:  # not an answer, a JSON-RPC error, not a result
            raise self._unavailable(f"answer {type(error).__name__}") from error

    def _unavailable(self, cause: str) -> McpUnavailable:
        self._tools = None  # the server may have changed: list again next time
        log.warning("MCP request failed: %s", cause)
        return McpUnavailable()

    async def list_prompts(self) -> mcp_types.ListPromptsResult:
        return mcp_types.ListPromptsResult(prompts=[])

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None) -> mcp_types.GetPromptResult:
        raise McpUnavailable(f"prompt {name} is not offered by the task server")

    async def _list(self, session: ClientSession) -> list[mcp_types.Tool]:
        initialized = await session.initialize()
        self._protocol_version = str(initialized.protocol_version)
        return list((await session.list_tools()).tools)

    async def _request(self, work: Any) -> Any:
        """One exchange in a client session of its own; transport failures are `McpUnavailable`."""
        try:
            async with self._session() as session:
                return await work(session)
        except (MCPError, httpx2.HTTPError, OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as error:
            raise self._unavailable(type(error).__name__) from error
        except BaseExceptionGroup as group:
            raise self._unavailable(str([type(e).__name__ for e in group.exceptions])) from group

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[ClientSession]:
        async with (
            streamable_http_client(self._url, http_client=self._http, terminate_on_close=False) as (read, write),
            ClientSession(read, write, read_timeout_seconds=self._timeout) as session,
        ):
            yield session
