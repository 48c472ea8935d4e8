"""How an agent run's exceptions map to the contract's failures.

Provider errors arrive as LiteLLM's (which subclass the `openai` errors), the SDK's own
(`MaxTurnsExceeded`, `ModelBehaviorError`, ...), or our `McpUnavailable`. Upstream text never reaches
a client: each maps to a fixed message. `describe` gives operators one line with the cause.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
from agents import MaxTurnsExceeded, ModelBehaviorError
from agents.exceptions import ModelTimeoutError
from mcp.shared.exceptions import MCPError

from backend.failures import McpUnavailable, ServiceError, TurnFailed


def classify(error: BaseException) -> ServiceError:
    """The failure a client is told about for an exception that ended a run."""
    if isinstance(error, ServiceError):
        return error
    # LiteLLM wraps errors raised while streaming (MidStreamFallbackError); judge the original.
    original = getattr(error, "original_exception", None)
    if isinstance(original, BaseException) and original is not error:
        return classify(original)
    if any(isinstance(cause, McpUnavailable | MCPError) for cause in _causes(error)):
        return McpUnavailable()
    if isinstance(error, TimeoutError | ModelTimeoutError | openai.APITimeoutError):
        return TurnFailed("The model took too long to answer; try again", code="model_timeout", retryable=True)
    if isinstance(error, MaxTurnsExceeded):
        return TurnFailed("The assistant needed too many steps for this request", code="max_turns_exceeded")
    if isinstance(error, openai.RateLimitError):
        return TurnFailed(
            "The model provider is rate limiting requests; try again", code="model_rate_limited", retryable=True
        )
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError) or _status(error) in (401, 403):
        return TurnFailed("The model provider rejected the server's credentials", code="model_auth_failed")
    # LiteLLM's OpenAI-compatible provider reports a refused connection as a 500 caused by one.
    if any(isinstance(cause, openai.APIConnectionError | httpx.ConnectError) for cause in _causes(error)):
        return TurnFailed(
            "The model provider could not be reached; try again", code="model_unavailable", retryable=True
        )
    if isinstance(error, openai.APIStatusError):
        return TurnFailed("The model provider returned an error", retryable=error.status_code >= 500)
    if isinstance(error, ModelBehaviorError):
        return TurnFailed("The model produced an invalid response", retryable=True)
    return TurnFailed("The assistant failed to answer", retryable=True)


def describe(error: BaseException, host: str | None = None) -> str:
    """One log line's worth of cause: the kind, the HTTP status, provider and host if known, no bodies.

    `host` is where the model is configured to be reached: LiteLLM's errors name a made-up URL.
    """
    original = getattr(error, "original_exception", None)
    if isinstance(original, BaseException) and original is not error:
        error = original
    parts = [type(error).__name__]
    if (status := _status(error)) is not None:
        parts.append(f"status={status}")
    if host:
        parts.append(f"host={host}")
    for attribute in ("llm_provider", "model"):
        if isinstance(value := getattr(error, attribute, None), str) and value:
            parts.append(f"{attribute.removeprefix('llm_')}={value}")
    if (cause := error.__cause__) is not None and not isinstance(cause, ServiceError):
        parts.append(f"cause={type(cause).__name__}")
    return " ".join(parts)


def _status(error: BaseException) -> int | None:
    status = getattr(error, "status_code", None)
    return status if isinstance(status, int) else None


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
