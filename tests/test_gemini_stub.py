"""The real LiteLLM Gemini code path (via the Agents SDK's LitellmModel) against the local GeminiStub."""

from __future__ import annotations

import time
from typing import Any

import pytest
from agents import (
    Agent,
    ModelRetryBackoffSettings,
    ModelRetrySettings,
    ModelSettings,
    ModelTimeoutError,
    Runner,
    RunResultStreaming,
    ToolCallItem,
    function_tool,
    retry_policies,
)
from agents.extensions.models.litellm_model import LitellmModel
from litellm import exceptions as llm_exc
from openai.types.responses import ResponseFunctionToolCall

from tests.conftest import GEMINI_TEST_KEY
from tests.support.gemini_stub import SECRET_MARKER, GeminiStub
from tests.support.servers import free_port

MODEL = "gemini/gemini-2.5-flash"
API_KEY = GEMINI_TEST_KEY


@function_tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def make_agent(stub: GeminiStub, settings: ModelSettings | None = None, **kwargs: Any) -> Agent[Any]:
    model = LitellmModel(MODEL, base_url=stub.base_url, api_key=API_KEY)
    return Agent(
        name="assistant",
        instructions="You are terse.",
        model=model,
        model_settings=settings or ModelSettings(),
        **kwargs,
    )


async def collect_deltas(result: RunResultStreaming) -> list[str]:
    deltas: list[str] = []
    async for event in result.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            deltas.append(event.data.delta)
    return deltas


FAST_RETRY = ModelRetrySettings(
    max_retries=3,
    backoff=ModelRetryBackoffSettings(initial_delay=0.01, max_delay=0.02, jitter=False),
    policy=retry_policies.any(
        retry_policies.provider_suggested(),  # 408/409/429/5xx, connection errors, timeouts
        retry_policies.network_error(),  # also ModelTimeoutError (ModelSettings.timeout)
        retry_policies.http_status([429, 500, 503]),
    ),
)


# --- (a) plain text ------------------------------------------------------------------------------
async def test_text_reply_and_usage(stub: GeminiStub) -> None:
    stub.reply_text("hello there", input_tokens=7, output_tokens=3)

    result = await Runner.run(make_agent(stub), "hi")

    assert result.final_output == "hello there"
    usage = result.context_wrapper.usage
    assert (usage.requests, usage.input_tokens, usage.output_tokens, usage.total_tokens) == (1, 7, 3, 10)
    [req] = stub.requests
    assert req.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert req.query == {}  # key is NOT in the query string with a custom base
    assert req.headers["x-goog-api-key"] == API_KEY
    assert "authorization" not in req.headers
    assert req.roles == ["user"]
    assert req.parts == [{"text": "hi"}]
    assert req.system_text == "You are terse."


async def test_empty_script_gives_default_answer(stub: GeminiStub) -> None:
    result = await Runner.run(make_agent(stub), "hi")
    assert result.final_output == "stub default answer"


async def test_reasoning_tokens_count_as_output(stub: GeminiStub) -> None:
    # Gemini's candidatesTokenCount excludes thoughts; LiteLLM adds thoughtsTokenCount to output tokens.
    stub.reply_text("ok", input_tokens=4, output_tokens=6, reasoning_tokens=2)
    usage = (await Runner.run(make_agent(stub), "hi")).context_wrapper.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (4, 8, 12)
    assert usage.output_tokens_details.reasoning_tokens == 2


# --- (b) function calling ------------------------------------------------------------------------
async def test_function_call_round_trip(stub: GeminiStub) -> None:
    stub.reply_function_call("add", {"a": 2, "b": 3}, thought_signature="c2lnLTEyMw==")
    stub.reply_text("2 + 3 = 5")

    result = await Runner.run(make_agent(stub, tools=[add]), "what is 2+3?")

    assert result.final_output == "2 + 3 = 5"
    assert result.context_wrapper.usage.requests == 2
    first, second = stub.requests
    assert [d["name"] for d in first.function_declarations] == ["add"]
    assert second.roles == ["user", "model", "user"]
    call_part, response_part = second.contents[1]["parts"][0], second.contents[2]["parts"][0]
    # LiteLLM sends snake_case part keys.
    assert call_part["function_call"] == {"name": "add", "args": {"a": 2, "b": 3}}
    assert call_part["thoughtSignature"] == "c2lnLTEyMw=="  # echoed back within the run
    assert response_part == {"function_response": {"name": "add", "response": {"content": "5"}}}


async def test_parallel_function_calls(stub: GeminiStub) -> None:
    stub.reply_function_call("add", {"a": 1, "b": 1}, more=[("add", {"a": 2, "b": 2})])
    stub.reply_text("2 and 4")

    result = await Runner.run(make_agent(stub, tools=[add]), "sums")

    assert result.final_output == "2 and 4"
    second = stub.requests[1]
    # The SDK's LitellmModel splits parallel calls into one model/user pair per call, and marks calls
    # without a signature with Google's literal "skip_thought_signature_validator".
    assert second.roles == ["user", "model", "user", "model", "user"]
    calls = [c["parts"][0] for c in second.contents if c["role"] == "model"]
    assert [p["function_call"]["args"] for p in calls] == [{"a": 1, "b": 1}, {"a": 2, "b": 2}]
    assert {p["thoughtSignature"] for p in calls} == {"skip_thought_signature_validator"}
    outputs = [c["parts"][0]["function_response"]["response"]["content"] for c in second.contents[2::2]]
    assert outputs == ["2", "4"]
    call_ids = [
        item.raw_item.call_id
        for item in result.new_items
        if isinstance(item, ToolCallItem) and isinstance(item.raw_item, ResponseFunctionToolCall)
    ]
    assert len(set(call_ids)) == 2  # LiteLLM invents ids (call_<uuid>); Gemini sends none


# --- (c) streaming -------------------------------------------------------------------------------
async def test_streamed_text_in_several_deltas_with_usage(stub: GeminiStub) -> None:
    stub.reply_text("one two three four", input_tokens=4, output_tokens=6)

    result = Runner.run_streamed(make_agent(stub, ModelSettings(include_usage=True)), "count")
    deltas = await collect_deltas(result)

    assert deltas == ["one ", "two ", "three ", "four"]
    assert result.final_output == "one two three four"
    usage = result.context_wrapper.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (4, 6, 10)
    [req] = stub.requests
    assert req.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert req.query == {"alt": "sse"}
    assert req.stream


async def test_streamed_usage_is_zero_without_include_usage(stub: GeminiStub) -> None:
    stub.reply_text("a b", input_tokens=4, output_tokens=6)
    result = Runner.run_streamed(make_agent(stub), "count")
    await collect_deltas(result)
    usage = result.context_wrapper.usage
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (1, 0, 0)


async def test_streamed_function_call(stub: GeminiStub) -> None:
    stub.reply_function_call("add", {"a": 20, "b": 22})
    stub.reply_text("it is 42")

    result = Runner.run_streamed(make_agent(stub, ModelSettings(include_usage=True), tools=[add]), "sum")
    deltas = await collect_deltas(result)

    assert "".join(deltas) == "it is 42"
    assert result.context_wrapper.usage.total_tokens == 30
    second = stub.requests[1]
    assert second.contents[2]["parts"][0]["function_response"]["response"] == {"content": "42"}


# --- (d) errors and retries ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "exc_type"),
    [
        (429, llm_exc.RateLimitError),
        (500, llm_exc.InternalServerError),
        (503, llm_exc.ServiceUnavailableError),
        (400, llm_exc.BadRequestError),
        (401, llm_exc.AuthenticationError),
        (404, llm_exc.NotFoundError),
    ],
)
async def test_errors_surface_as_litellm_exceptions(stub: GeminiStub, status: int, exc_type: type[Exception]) -> None:
    stub.reply_error(status)
    with pytest.raises(exc_type) as info:
        await Runner.run(make_agent(stub), "hi")
    assert getattr(info.value, "status_code", None) == status
    assert len(stub.requests) == 1  # no retry unless ModelSettings.retry says so
    # LiteLLM puts the upstream body into str(exc): callers must not show it to users.
    assert SECRET_MARKER in str(info.value)


@pytest.mark.parametrize(
    ("status", "original_type"),
    [(429, llm_exc.RateLimitError), (500, llm_exc.InternalServerError), (503, llm_exc.ServiceUnavailableError)],
)
async def test_streamed_429_and_5xx_are_wrapped(stub: GeminiStub, status: int, original_type: type[Exception]) -> None:
    stub.reply_error(status)
    with pytest.raises(llm_exc.MidStreamFallbackError) as info:
        await collect_deltas(Runner.run_streamed(make_agent(stub), "hi"))
    # A ServiceUnavailableError subclass, but status_code is the upstream one.
    assert info.value.status_code == status
    assert isinstance(info.value.original_exception, original_type)


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [(400, llm_exc.BadRequestError), (401, llm_exc.AuthenticationError), (404, llm_exc.NotFoundError)],
)
async def test_streamed_4xx_are_not_wrapped(stub: GeminiStub, status: int, exc_type: type[Exception]) -> None:
    stub.reply_error(status)
    with pytest.raises(exc_type) as info:
        await collect_deltas(Runner.run_streamed(make_agent(stub), "hi"))
    assert not isinstance(info.value, llm_exc.MidStreamFallbackError)
    assert getattr(info.value, "status_code", None) == status


async def test_wrong_api_key_is_authentication_error() -> None:
    with GeminiStub(expected_api_key="right-key") as stub:
        good = LitellmModel(MODEL, base_url=stub.base_url, api_key="right-key")
        assert (await Runner.run(Agent(name="a", model=good), "hi")).final_output == "stub default answer"
        # Google answers 400 "API key not valid"; LiteLLM maps that text to AuthenticationError.
        with pytest.raises(llm_exc.AuthenticationError) as info:
            await Runner.run(make_agent(stub), "hi")
        assert info.value.status_code == 401
        assert stub.requests[-1].api_key == API_KEY


async def test_connection_refused() -> None:
    model = LitellmModel(MODEL, base_url=f"http://127.0.0.1:{free_port()}/v1beta", api_key=API_KEY)
    with pytest.raises(llm_exc.APIConnectionError):
        await Runner.run(Agent(name="a", model=model), "hi")


async def test_retry_after_429_and_500(stub: GeminiStub) -> None:
    stub.reply_error(429)
    stub.reply_error(500)
    stub.reply_text("finally", input_tokens=3, output_tokens=2)

    result = await Runner.run(make_agent(stub, ModelSettings(retry=FAST_RETRY)), "hi")

    assert result.final_output == "finally"
    assert len(stub.requests) == 3
    usage = result.context_wrapper.usage
    assert (usage.requests, usage.total_tokens) == (3, 5)  # failed attempts count as requests


async def test_retry_when_streaming(stub: GeminiStub) -> None:
    stub.reply_error(429)
    stub.reply_text("streamed ok")
    result = Runner.run_streamed(make_agent(stub, ModelSettings(retry=FAST_RETRY, include_usage=True)), "hi")
    assert await collect_deltas(result) == ["streamed ", "ok"]
    assert len(stub.requests) == 2


async def test_retry_gives_up_after_max_retries(stub: GeminiStub) -> None:
    for _ in range(3):
        stub.reply_error(429)
    retry = ModelRetrySettings(max_retries=2, backoff=FAST_RETRY.backoff, policy=FAST_RETRY.policy)
    settings = ModelSettings(retry=retry)
    with pytest.raises(llm_exc.RateLimitError):
        await Runner.run(make_agent(stub, settings), "hi")
    assert len(stub.requests) == 3


async def test_retry_settings_without_policy_do_not_retry(stub: GeminiStub) -> None:
    stub.reply_error(429)
    with pytest.raises(llm_exc.RateLimitError):
        await Runner.run(make_agent(stub, ModelSettings(retry=ModelRetrySettings(max_retries=3))), "hi")
    assert len(stub.requests) == 1


async def test_litellm_num_retries_does_nothing(stub: GeminiStub) -> None:
    stub.reply_error(429)
    with pytest.raises(llm_exc.RateLimitError):
        await Runner.run(make_agent(stub, ModelSettings(extra_args={"num_retries": 2})), "hi")
    assert len(stub.requests) == 1


async def test_bad_request_is_not_retried(stub: GeminiStub) -> None:
    stub.reply_error(400)
    with pytest.raises(llm_exc.BadRequestError):
        await Runner.run(make_agent(stub, ModelSettings(retry=FAST_RETRY)), "hi")
    assert len(stub.requests) == 1


# --- (e) timeouts --------------------------------------------------------------------------------
async def test_sdk_timeout_raises_model_timeout_error(stub: GeminiStub) -> None:
    stub.reply_delay(5.0)
    started = time.monotonic()
    with pytest.raises(ModelTimeoutError):
        await Runner.run(make_agent(stub, ModelSettings(timeout=0.2)), "hi")
    assert time.monotonic() - started < 2


async def test_sdk_timeout_when_streaming(stub: GeminiStub) -> None:
    stub.reply_delay(5.0)
    with pytest.raises(ModelTimeoutError):
        await collect_deltas(Runner.run_streamed(make_agent(stub, ModelSettings(timeout=0.2)), "hi"))


async def test_litellm_timeout_raises_litellm_timeout(stub: GeminiStub) -> None:
    stub.reply_delay(5.0)
    with pytest.raises(llm_exc.Timeout):
        await Runner.run(make_agent(stub, ModelSettings(extra_args={"timeout": 0.2})), "hi")


async def test_litellm_timeout_is_ignored_when_streaming(stub: GeminiStub) -> None:
    # The streaming path builds its HTTP client without the timeout: only ModelSettings.timeout helps.
    stub.reply_delay(0.5, text="late but fine")
    result = Runner.run_streamed(make_agent(stub, ModelSettings(extra_args={"timeout": 0.1})), "hi")
    assert "".join(await collect_deltas(result)) == "late but fine"


async def test_timeout_then_retry_succeeds(stub: GeminiStub) -> None:
    stub.reply_delay(5.0)
    stub.reply_text("second try")
    result = await Runner.run(make_agent(stub, ModelSettings(timeout=0.2, retry=FAST_RETRY)), "hi")
    assert result.final_output == "second try"
    assert len(stub.requests) == 2
