"""Builds the per-request agent: instructions, the model, the task tools, settings.

An `Agent` and a `LitellmModel` are plain objects: building them for each turn is cheap and keeps
every request independent of the last one. The task tools are the process-wide `TaskServer`; who they
act for travels with each turn (see mcp_client).
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

from agents import Agent, Model, ModelSettings, RunConfig, Runner, Tool, retry_policies
from agents.retry import ModelRetryBackoffSettings, ModelRetrySettings

from backend.agent.offline import OfflineModel
from backend.config import OFFLINE_MODEL, Settings

log = logging.getLogger(__name__)

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
    _prepare_litellm()
    from agents.extensions.models.litellm_model import LitellmModel  # imported at start-up by `warm_up`

    return LitellmModel(
        model=name,
        base_url=settings.model_api_base,
        api_key=settings.model_api_key or (settings.gemini_api_key if name.startswith("gemini/") else None),
    )


@cache  # once per process: Logger.setLevel clears every logger's level cache, per turn it showed in profiles
def _prepare_litellm() -> None:
    """Before LiteLLM's first import: its model cost map from the package rather than fetched at import
    (no network at start-up; containers have none). Then quiet: it prints a help banner per error and
    logs provider bodies (which may echo a key or the user's text); the turn's own one-line warning
    says what failed (see agent/failures.describe)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # OpenAI-compatible providers (`openai/...`) through LiteLLM's own HTTP handler, as its Gemini
    # provider already is, rather than the OpenAI SDK, whose request transform walks every message
    # against each type of a union on every call: about half of a call's CPU (README, Performance).
    os.environ.setdefault("EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER", "True")
    import litellm

    litellm.suppress_debug_info = True
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


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


def run_config(settings: Settings) -> RunConfig:
    # Per run rather than process-wide: without an OpenAI key the trace exporter logs a warning a run.
    return RunConfig(tracing_disabled=not settings.tracing_enabled)


def build_agent(settings: Settings, model: Model, tools: list[Tool]) -> Agent[Any]:
    """A fresh agent per turn; `tools` are the task server's, shared (see TaskServer.function_tools)."""
    return Agent(
        name="Task assistant",
        instructions=INSTRUCTIONS,
        model=model,
        model_settings=model_settings(settings),
        tools=tools,
    )


def _warm_platform_headers() -> None:
    """The OpenAI SDK describes the platform in headers on its first request, once per process;
    that runs `uname -p` in a subprocess and reads /etc/os-release (~30 ms of the first turn)."""
    try:  # a private helper: should it move, the first request pays for it instead
        from openai import __version__
        from openai._base_client import platform_headers
    except ImportError:
        return
    platform_headers(__version__, platform=None)


def _warm_openai_types() -> None:
    """The OpenAI SDK imports its chat resource on first use and builds its response models' validators
    on first parse (~50 ms); LiteLLM's OpenAI-compatible providers parse every answer with them."""
    from openai.resources.chat import AsyncChat  # noqa: F401
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    _warm_platform_headers()

    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = {"role": "assistant", "content": "warm", "tool_calls": [call]}
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    common = {"id": "warm", "created": 0, "model": "warm", "usage": usage}
    choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
    ChatCompletion.model_validate({**common, "object": "chat.completion", "choices": [choice]})
    delta = {"index": 0, "delta": {"content": "warm", "tool_calls": [{"index": 0, **call}]}, "finish_reason": None}
    ChatCompletionChunk.model_validate({**common, "object": "chat.completion.chunk", "choices": [delta]})


async def warm_up(settings: Settings) -> None:
    """Pay one-time costs at start-up instead of in the first user's turn: LiteLLM's import (~2 s)
    and its first completion (lazy imports, response models built on first use), jsonschema, the
    SDK's run machinery, and anyio's worker-thread runner (every database unit of work uses it).

    With a LiteLLM model configured, the warm-up runs that model through LiteLLM's own completion
    path, streamed and not, with `mock_response` (no network); otherwise the offline model.
    """
    import anyio.to_thread
    import jsonschema.validators  # noqa: F401  (the MCP client checks tool schemas with it)

    await anyio.to_thread.run_sync(lambda: None)
    model: Model = OfflineModel()
    warm = ModelSettings()
    if settings.model_name != OFFLINE_MODEL:
        _prepare_litellm()  # before anything below imports LiteLLM
        _warm_openai_types()
        # Imported by LiteLLM's provider timing on the first real request (mock responses skip it).
        import litellm._service_logger  # noqa: F401

        model = make_model(settings)
        warm = ModelSettings(include_usage=True, extra_args={"mock_response": "warm"})
    agent: Agent[Any] = Agent(name="warm-up", model=model, model_settings=warm)
    await Runner.run(agent, "warm up", run_config=run_config(settings))
    async for _ in Runner.run_streamed(agent, "warm up", run_config=run_config(settings)).stream_events():
        pass
