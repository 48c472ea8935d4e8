"""The offline model's command parsing: deterministic, and help for anything else."""

from __future__ import annotations

from typing import Any

import pytest
from agents import Agent, RawResponsesStreamEvent, Runner
from agents.mcp import MCPServerStreamableHttp
from openai.types.responses import ResponseTextDeltaEvent

from backend.agent.offline import HELP, OfflineModel, plan_reply
from backend.delegation import mint_operator_token
from backend.mcp_server.app import create_mcp_app
from tests.conftest import TEST_MCP_SECRET, make_settings
from tests.support.servers import free_port, serve_in_thread

TOOLS = {"add_task", "list_tasks", "complete_task", "update_task", "delete_task"}


@pytest.mark.parametrize(
    ("text", "tool", "arguments"),
    [
        ("add buy milk", "add_task", {"title": "buy milk"}),
        ("Add a task: call the plumber", "add_task", {"title": "call the plumber"}),
        ("remind me to water the plants.", "add_task", {"title": "water the plants"}),
        ("show my tasks", "list_tasks", {"status": "all"}),
        ("what are my todos?", "list_tasks", {"status": "all"}),
        ("what's on my list?", "list_tasks", {"status": "all"}),
        ("list", "list_tasks", {"status": "all"}),
        ("show pending tasks", "list_tasks", {"status": "pending"}),
        ("show completed tasks", "list_tasks", {"status": "completed"}),
        ("show tasks that are not done", "list_tasks", {"status": "pending"}),
        ("list tasks I have done", "list_tasks", {"status": "completed"}),
        ("complete task 3", "complete_task", {"task_id": 3}),
        ("mark #4 as done", "complete_task", {"task_id": 4}),
        ("task 5 is done", "complete_task", {"task_id": 5}),
        ("delete 2", "delete_task", {"task_id": 2}),
        ("remove task 7!", "delete_task", {"task_id": 7}),
        ("rename task 4 to call mom", "update_task", {"task_id": 4, "title": "call mom"}),
        ('change 9: "renew passport"', "update_task", {"task_id": 9, "title": "renew passport"}),
    ],
)
def test_commands(text: str, tool: str, arguments: dict[str, Any]) -> None:
    plan = plan_reply([{"role": "user", "content": text}], TOOLS)
    assert (plan.tool, plan.arguments) == (tool, arguments)


@pytest.mark.parametrize("text", ["hello", "what's the weather?", "delete everything", "complete the milk one"])
def test_anything_else_gets_help(text: str) -> None:
    assert plan_reply([{"role": "user", "content": text}], TOOLS).text == HELP


def test_only_the_latest_message_counts_and_tool_output_is_described() -> None:
    items: list[Any] = [
        {"role": "user", "content": "add buy milk"},
        {"role": "assistant", "content": "Added task 1: buy milk"},
        {"role": "user", "content": "delete 1"},
        {"type": "function_call", "call_id": "c1", "name": "delete_task", "arguments": '{"task_id": 1}'},
        {
            "type": "function_call_output",
            "call_id": "c1",
            "output": '{"task_id": 1, "status": "deleted", "title": "buy milk"}',
        },
    ]
    assert plan_reply(items, TOOLS).text == "Deleted task 1: buy milk"
    items[-1]["output"] = "Error executing tool delete_task: task 1 not found"
    assert plan_reply(items, TOOLS).text == "That did not work: task 1 not found."


@pytest.mark.parametrize(
    ("output", "sentence"),
    [
        # How the Agents SDK hands an MCP error result back to the model: a list of input_text parts.
        (
            [{"type": "input_text", "text": "Error executing tool delete_task: task 4 not found"}],
            "That did not work: task 4 not found.",
        ),
        (
            '{"type": "text", "text": "Error executing tool add_task: title must be 1-200 characters"}',
            "That did not work: title must be 1-200 characters.",
        ),
        (
            [
                {"type": "input_text", "text": "Error executing tool add_task: unexpected argument user_id"},
                {"type": "input_image", "image_url": "data:,"},
            ],
            "That did not work: unexpected argument user_id.",
        ),
        (
            "the task database is unavailable; try again shortly",
            "That did not work: the task database is unavailable; try again shortly.",
        ),
        ([], "That did not work: the task service gave no answer."),
    ],
)
def test_tool_errors_read_as_sentences(output: Any, sentence: str) -> None:
    items: list[Any] = [
        {"role": "user", "content": "delete 4"},
        {"type": "function_call", "call_id": "c1", "name": "delete_task", "arguments": '{"task_id": 4}'},
        {"type": "function_call_output", "call_id": "c1", "output": output},
    ]
    text = plan_reply(items, TOOLS).text
    assert text == sentence
    assert "{" not in (text or "") and "input_text" not in (text or "")


async def test_against_the_real_mcp_server(database_url: str) -> None:
    """The offline model in the Agents SDK loop, calling the real task tools over HTTP."""
    port = free_port()
    settings = make_settings(database_url, mcp_url=f"http://127.0.0.1:{port}/mcp")
    with serve_in_thread(create_mcp_app(settings), port=port):
        for user in ("bob", "alice"):
            token = mint_operator_token(TEST_MCP_SECRET, user)
            params: Any = {"url": settings.mcp_url, "headers": {"Authorization": f"Bearer {token}"}}
            async with MCPServerStreamableHttp(params=params, name="tasks", use_structured_content=True) as mcp:
                agent = Agent(name="offline", model=OfflineModel(), mcp_servers=[mcp])

                async def say(text: str) -> str:
                    return str((await Runner.run(agent, text)).final_output)  # noqa: B023

                # Numbers are per user: each user's first task is task 1.
                assert await say("add buy milk") == "Added task 1: buy milk"
                assert await say("complete task 9") == "That did not work: task 9 not found."
                assert await say("show my tasks") == "You have 1 task:\n- [ ] 1: buy milk"


def test_without_tools_it_only_helps() -> None:
    assert plan_reply([{"role": "user", "content": "add buy milk"}], set()).text == HELP


async def test_runs_in_the_agents_sdk_and_reports_usage() -> None:
    agent = Agent(name="offline", model=OfflineModel())
    result = await Runner.run(agent, "hello")
    assert "offline model" in result.final_output
    usage = result.context_wrapper.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    streamed = Runner.run_streamed(agent, "hello")
    deltas = [
        event.data.delta
        async for event in streamed.stream_events()
        if isinstance(event, RawResponsesStreamEvent) and isinstance(event.data, ResponseTextDeltaEvent)
    ]
    assert len(deltas) > 10 and "".join(deltas) == result.final_output
