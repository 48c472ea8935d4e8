"""The offline model: a small deterministic Agents SDK `Model` for trying the stack with no key.

It understands plain task commands ("add buy milk", "show my tasks", "complete task 3", "delete 2",
"rename task 4 to call mom"), calls the real MCP tools through the normal agent loop, streams its
answer word by word and reports (estimated) token usage. Anything else gets a help text that says
what it is and how to configure Gemini.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from agents import Model, ModelResponse, ModelSettings, ModelTracing, Tool, Usage
from agents.agent_output import AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.items import TResponseInputItem, TResponseOutputItem, TResponseStreamEvent
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response_prompt_param import ResponsePromptParam
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from backend.agent.tool_output import parse_tool_output

MODEL_NAME = "offline"

HELP = (
    "I'm the offline model: a small built-in stand-in that only understands plain task commands, "
    "so you can try this backend without an API key. Try:\n"
    '- "add buy milk"\n'
    '- "show my tasks" (or "show pending tasks", "show completed tasks")\n'
    '- "complete task 3"\n'
    '- "rename task 4 to call mom"\n'
    '- "delete task 2"\n'
    "For real conversations, set GEMINI_API_KEY (and optionally CHAT_MODEL=gemini/gemini-2.5-flash) "
    "and restart."
)

_ID = r"(?:task\s*)?(?:number\s*|no\.?\s*|#\s*)?(?P<id>\d+)"
_DONE = r"(?:done|complete|completed|finished)"
_COMMANDS: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(pattern, re.I))
    for name, pattern in [
        ("update_task", rf"^(?:rename|update|change|edit)\s+{_ID}\s*(?:to|:|=|->)\s*(?P<title>.+)$"),
        ("complete_task", rf"^(?:complete|finish|check off|tick off|mark)\s+{_ID}(?:\s+(?:as\s+)?{_DONE})?$"),
        ("complete_task", rf"^{_ID}\s+(?:is\s+)?{_DONE}$"),
        ("delete_task", rf"^(?:delete|remove|drop|cancel)\s+{_ID}$"),
        ("list_tasks", r"^(?:show|list|display|what(?:'s| are| is)?|get|see|view)\b.*\b(?:tasks?|todos?|to-dos?)\b.*$"),
        ("list_tasks", r"^(?:list|tasks|todos?|(?:show|what(?:'s| is)?) (?:on )?my (?:list|todo list|to-do list))\??$"),
        (
            "add_task",
            r"^(?:add|create|new|remember to|remind me to|todo:?)\s+(?:a\s+)?(?:new\s+)?(?:task\s*:?\s*)?(?:to\s+)?"
            r"(?P<title>.+)$",
        ),
    ]
]


@dataclass(frozen=True)
class _Plan:
    text: str | None = None
    tool: str | None = None
    arguments: dict[str, Any] | None = None


def plan_reply(items: list[TResponseInputItem], tool_names: set[str]) -> _Plan:
    """What to do for this input: call a tool for the latest user command, or answer in text."""
    outputs: list[tuple[str, Any]] = []
    calls: dict[str, str] = {}
    user_text = ""
    for item in items:
        data = cast(dict[str, Any], item)
        kind = data.get("type")
        if data.get("role") == "user" and kind in (None, "message"):
            user_text, outputs, calls = _text_of(data.get("content")), [], {}
        elif kind == "function_call":
            calls[str(data.get("call_id"))] = str(data.get("name"))
        elif kind == "function_call_output":
            outputs.append((calls.get(str(data.get("call_id")), ""), data.get("output")))
    if outputs:
        return _Plan(text="\n".join(_describe(name, output) for name, output in outputs))
    return _command(user_text.strip().rstrip(".!"), tool_names)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _command(text: str, tool_names: set[str]) -> _Plan:
    for tool, pattern in _COMMANDS:
        match = pattern.match(text)
        if match is None or tool not in tool_names:
            continue
        groups = match.groupdict()
        if tool == "list_tasks":
            return _Plan(tool=tool, arguments={"status": _status_filter(text.lower())})
        arguments: dict[str, Any] = {}
        if groups.get("id"):
            arguments["task_id"] = int(groups["id"])
        if groups.get("title"):
            arguments["title"] = groups["title"].strip().strip("\"'")
        return _Plan(tool=tool, arguments=arguments)
    return _Plan(text=HELP)


def _status_filter(text: str) -> str:
    if re.search(r"pending|open|remaining|not (?:yet )?done|incomplete|unfinished", text):
        return "pending"
    return "completed" if re.search(r"\b(?:completed|done|finished)\b", text) else "all"


def _describe(tool: str, output: Any) -> str:
    data = parse_tool_output(output)
    if isinstance(data, dict) and isinstance(data.get("tasks"), list):
        tasks = data["tasks"]
        if not tasks:
            return "You have no tasks here."
        lines = [f"- [{'x' if t.get('completed') else ' '}] {t.get('task_id')}: {t.get('title')}" for t in tasks]
        return f"You have {len(tasks)} task{'s' if len(tasks) != 1 else ''}:\n" + "\n".join(lines)
    if isinstance(data, dict) and "task_id" in data:
        verb = {"created": "Added", "completed": "Completed", "updated": "Updated", "deleted": "Deleted"}
        return f"{verb.get(str(data.get('status')), 'Done with')} task {data['task_id']}: {data.get('title')}"
    reason = _error_sentence(data)
    return f"That did not work: {reason}{'' if reason.endswith(('.', '!', '?')) else '.'}"


# The MCP SDK's frame around every tool error; the reason after it is the part a person needs.
_TOOL_ERROR_FRAME = re.compile(r"^Error executing tool \w+:\s*")


def _error_sentence(data: Any) -> str:
    """A failed tool call's text, however the agent loop wrapped it: a string, a text part, or a list of parts.

    An MCP error result reaches the model as `[{"type": "input_text", "text": "Error executing tool ..."}]`.
    """
    parts = data if isinstance(data, list) else [data]
    texts = [part.get("text") if isinstance(part, dict) else part for part in parts]
    reasons = [_TOOL_ERROR_FRAME.sub("", text).strip() for text in texts if isinstance(text, str)]
    return " ".join(reason for reason in reasons if reason) or "the task service gave no answer"


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _input_tokens(system: str | None, items: list[TResponseInputItem]) -> int:
    return _tokens((system or "") + json.dumps(items, default=str))


class OfflineModel(Model):
    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        response = self._respond(system_instructions, input, tools)
        return ModelResponse(output=response.output, usage=_usage(response), response_id=response.id)

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        response = self._respond(system_instructions, input, tools)
        seq = iter(range(1_000_000))
        started = response.model_copy(update={"output": [], "status": "in_progress", "usage": None})
        yield ResponseCreatedEvent(type="response.created", response=started, sequence_number=next(seq))
        for index, item in enumerate(response.output):
            if isinstance(item, ResponseOutputMessage):
                text = cast(ResponseOutputText, item.content[0]).text
                empty = item.model_copy(update={"content": [], "status": "in_progress"})
                part = ResponseOutputText(type="output_text", text="", annotations=[], logprobs=[])
                yield ResponseOutputItemAddedEvent(
                    type="response.output_item.added", item=empty, output_index=index, sequence_number=next(seq)
                )
                at: dict[str, Any] = {"item_id": item.id, "output_index": index, "content_index": 0}
                yield ResponseContentPartAddedEvent(
                    type="response.content_part.added", part=part, sequence_number=next(seq), **at
                )
                for token in re.findall(r"\S+\s*|\s+", text):
                    await asyncio.sleep(0)  # let the consumer flush each token
                    yield ResponseTextDeltaEvent(
                        type="response.output_text.delta", delta=token, logprobs=[], sequence_number=next(seq), **at
                    )
                yield ResponseTextDoneEvent(
                    type="response.output_text.done", text=text, logprobs=[], sequence_number=next(seq), **at
                )
                yield ResponseContentPartDoneEvent(
                    type="response.content_part.done",
                    part=part.model_copy(update={"text": text}),
                    sequence_number=next(seq),
                    **at,
                )
            else:
                yield ResponseOutputItemAddedEvent(
                    type="response.output_item.added", item=item, output_index=index, sequence_number=next(seq)
                )
            yield ResponseOutputItemDoneEvent(
                type="response.output_item.done", item=item, output_index=index, sequence_number=next(seq)
            )
        yield ResponseCompletedEvent(type="response.completed", response=response, sequence_number=next(seq))

    def _respond(self, system: str | None, input: str | list[TResponseInputItem], tools: list[Tool]) -> Response:
        items: list[TResponseInputItem] = (
            [cast(TResponseInputItem, {"role": "user", "content": input})] if isinstance(input, str) else input
        )
        plan = plan_reply(items, {tool.name for tool in tools})
        output: list[TResponseOutputItem]
        if plan.tool is not None:
            call_id = f"call_{uuid.uuid4().hex[:12]}"
            output = [
                ResponseFunctionToolCall(
                    type="function_call",
                    id=f"fc_{call_id}",
                    call_id=call_id,
                    name=plan.tool,
                    arguments=json.dumps(plan.arguments or {}),
                    status="completed",
                )
            ]
            produced = json.dumps(plan.arguments)
        else:
            text = plan.text or HELP
            output = [
                ResponseOutputMessage(
                    type="message",
                    id=f"msg_{uuid.uuid4().hex[:12]}",
                    role="assistant",
                    status="completed",
                    content=[ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])],
                )
            ]
            produced = text
        input_tokens, output_tokens = _input_tokens(system, items), _tokens(produced)
        return Response(
            id=f"resp_{uuid.uuid4().hex[:12]}",
            created_at=0,
            model=MODEL_NAME,
            object="response",
            output=output,
            parallel_tool_calls=False,
            tool_choice="auto",
            tools=[],
            status="completed",
            usage=ResponseUsage(
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                total_tokens=input_tokens + output_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
                output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
            ),
        )


def _usage(response: Response) -> Usage:
    usage = response.usage
    assert usage is not None
    return Usage(
        requests=1,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
    )
