"""A local stub of the OpenAI chat-completions REST API, scripted like `GeminiStub` (same `reply_*`).

For `CHAT_MODEL=openai/<name>` (and OpenAI-compatible servers such as vLLM) with `MODEL_API_BASE` at
`stub.base_url`: LiteLLM POSTs to `{base}/chat/completions`, the key in `Authorization: Bearer`.
A streamed answer is SSE chunks, then a usage-only chunk (the client asks with `stream_options`),
then `data: [DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from starlette.responses import JSONResponse, Response

from tests.support.gemini_stub import GeminiStub, RecordedRequest, Reply, _split_text

_ERROR_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 429: "rate_limit_exceeded"}


class OpenAIStub(GeminiStub):
    def __init__(self, *, expected_api_key: str | None = None) -> None:
        super().__init__(expected_api_key=expected_api_key, path_prefix="/v1")

    _STREAM_END = b"data: [DONE]\n\n"

    def _route(self, path: str, body: Any) -> tuple[str, bool] | None:
        if not path.endswith("/chat/completions") or not isinstance(body, dict):
            return None
        return str(body.get("model")), bool(body.get("stream"))

    def _api_key(self, record: RecordedRequest) -> str | None:
        return record.headers.get("authorization", "").removeprefix("Bearer ") or None

    def _wrong_key(self) -> Response:
        return self._error(401, "Incorrect API key provided.", "invalid_api_key")

    def _error(
        self, status_code: int, message: str, status: str | None, headers: Mapping[str, str] | None = None
    ) -> Response:
        kind = _ERROR_TYPE.get(status_code, "server_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))

    def _full(self, reply: Reply, number: int, model: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
        if reply.calls:
            message["tool_calls"] = _tool_calls(reply, number)
        choice = {"index": 0, "message": message, "finish_reason": _finish(reply), "logprobs": None}
        return {**_head(number, model, "chat.completion"), "choices": [choice], "usage": _usage(reply)}

    def _chunks(self, reply: Reply, number: int, model: str) -> Iterator[dict[str, Any]]:
        head = _head(number, model, "chat.completion.chunk")
        pieces = reply.chunks if reply.chunks is not None else (_split_text(reply.text) if reply.text else [])
        for i, piece in enumerate(pieces):
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            yield {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        if reply.calls:
            calls = [{"index": i, **call} for i, call in enumerate(_tool_calls(reply, number))]
            yield {**head, "choices": [{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": None}]}
        yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": _finish(reply)}]}
        yield {**head, "choices": [], "usage": _usage(reply)}


def _head(number: int, model: str, kind: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-stub-{number}", "object": kind, "created": 0, "model": model}


def _tool_calls(reply: Reply, number: int) -> list[dict[str, Any]]:
    return [
        {"id": f"call_{number}_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for i, (name, args) in enumerate(reply.calls)
    ]


def _finish(reply: Reply) -> str:
    return "tool_calls" if reply.calls else "stop"


def _usage(reply: Reply) -> dict[str, int]:
    total = reply.input_tokens + reply.output_tokens
    return {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens, "total_tokens": total}
