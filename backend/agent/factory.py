"""Builds the per-request agent: model, MCP server with the turn's delegation token, settings.

An `Agent`, a `LitellmModel` and an `MCPServerStreamableHttp` are plain objects; building them for
each turn is cheap and keeps every request independent of the last one.
"""

from __future__ import annotations

import json
import ssl
from collections import Counter
from functools import cache
from types import SimpleNamespace
from typing import Any, cast

import httpx2
from agents import Agent, Model, ModelSettings, ModelTracing, Tool, retry_policies
from agents.exceptions import UserError
from agents.mcp import MCPServerStreamableHttp
from agents.retry import ModelRetryBackoffSettings, ModelRetrySettings
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult

from backend.agent.offline import OfflineModel
from backend.config import OFFLINE_MODEL, Settings
from backend.delegation import CALL_META

INSTRUCTIONS = """\
You are a friendly, concise assistant that manages the user's todo list.

Use the task tools for every task operation; never invent tasks, ids or results.
- To add, call add_task with a short title (and a description only when the user gave details).
- To show tasks, call list_tasks (status "pending" or "completed" when the user asks for those).
- To complete, rename/update or delete a task the user names by title, call list_tasks first to
  find its id, then act on that id. If several tasks match, ask which one.
- After a tool call, confirm what changed in one short sentence, mentioning the task id and title.
- If a tool reports an error (for example "task 7 not found"), say so plainly.
Answer other questions briefly and steer back to tasks when it helps. Plain text, no tables.
"""

# Transient provider failures worth another try, handled by the Agents SDK's retry loop.
_RETRY_STATUSES = (408, 429, 500, 502, 503, 504)


def make_model(settings: Settings) -> Model:
    name = settings.model_name
    if name == OFFLINE_MODEL:
        return OfflineModel()
    from agents.extensions.models.litellm_model import LitellmModel  # heavy import: only when used

    return LitellmModel(
        model=name,
        base_url=settings.model_api_base,
        api_key=settings.model_api_key or (settings.gemini_api_key if name.startswith("gemini/") else None),
    )


def model_settings(settings: Settings) -> ModelSettings:
    return ModelSettings(
        temperature=settings.model_temperature,
        include_usage=True,  # usage in streamed chat-completions responses
        timeout=settings.model_timeout_seconds,
        retry=ModelRetrySettings(
            max_retries=settings.model_max_retries,
            backoff=ModelRetryBackoffSettings(initial_delay=0.5, max_delay=4.0, multiplier=2.0, jitter=True),
            policy=retry_policies.any(
                retry_policies.provider_suggested(),
                retry_policies.network_error(),
                retry_policies.http_status(_RETRY_STATUSES),
            ),
        ),
    )


@cache
def _ssl_context() -> ssl.SSLContext:
    # One context for the process: building one per MCP connection costs ~20 ms of CPU per turn.
    return ssl.create_default_context()


def _mcp_http_client(
    headers: dict[str, str] | None = None, timeout: Any = None, auth: Any = None
) -> httpx2.AsyncClient:
    kwargs: dict[str, Any] = {"headers": headers, "verify": _ssl_context(), "follow_redirects": False}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if auth is not None:
        kwargs["auth"] = auth
    return httpx2.AsyncClient(**kwargs)


class McpUnavailable(Exception):
    """The MCP server could not be reached, or went away during the turn (answered 503)."""


class TaskServer(MCPServerStreamableHttp):
    """The task server as one run sees it.

    Marks each call with its occurrence among identical calls (see `tool_call`), and marks transport
    failures as such: the SDK reports a lost connection as a plain `UserError` with its cause
    stripped (so no URL or credential leaks); re-raising it as `McpUnavailable` answers 503, not 502.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._calls: Counter[str] = Counter()

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None = None
    ) -> CallToolResult:
        # Number identical calls within this run (one server per run): a re-run of the turn that
        # makes the same calls gets the recorded results instead of adding a task twice.
        signature = json.dumps([tool_name, arguments], sort_keys=True, default=str)
        occurrence = self._calls[signature]
        self._calls[signature] += 1
        meta = {**(meta or {}), CALL_META: occurrence}
        try:
            return await super().call_tool(tool_name, arguments, meta)
        except (UserError, MCPError) as exc:
            raise McpUnavailable(f"tool call {tool_name} failed") from exc


def make_mcp_server(settings: Settings, delegation_token: str) -> MCPServerStreamableHttp:
    """The task tools, acting for exactly the user the delegation token names."""
    return TaskServer(
        name="tasks",
        params={
            "url": settings.mcp_url,
            "headers": {"Authorization": f"Bearer {delegation_token}"},
            "timeout": settings.mcp_timeout_seconds,
            "sse_read_timeout": settings.mcp_timeout_seconds,
            "httpx_client_factory": _mcp_http_client,
        },
        cache_tools_list=True,  # one list_tools per turn, not one per model call (a fresh server per turn)
        client_session_timeout_seconds=settings.mcp_timeout_seconds,
        max_retry_attempts=1,
        use_structured_content=True,
        # A transport failure (the server went away) fails the turn with 503 instead of becoming a
        # tool message the model would apologise for; tool *errors* ("task 7 not found") still reach it.
        failure_error_function=None,
    )


def build_agent(settings: Settings, model: Model, mcp_server: MCPServerStreamableHttp) -> Agent[Any]:
    return Agent(
        name="Task assistant",
        instructions=INSTRUCTIONS,
        model=model,
        model_settings=model_settings(settings),
        mcp_servers=[mcp_server],
    )


async def warm_up() -> None:
    """Pay one-time costs at start-up instead of in the first user's turn (~0.5 s measured):
    building the pydantic models of the response stream events, and importing jsonschema, which
    the MCP client uses to check tool results against the tools' output schemas."""
    import jsonschema.validators  # noqa: F401

    _ssl_context()
    # A text answer and a tool call: the two shapes of response a turn streams.
    tool = cast(Tool, SimpleNamespace(name="add_task"))
    for text, tools in (("warm up", []), ("add warm up", [tool])):
        async for _ in OfflineModel().stream_response(
            None,
            text,
            ModelSettings(),
            tools,
            None,
            [],
            ModelTracing.DISABLED,
            previous_response_id=None,
            conversation_id=None,
            prompt=None,
        ):
            pass
