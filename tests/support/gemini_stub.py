"""A local stub of Google Gemini's REST API (generateContent / streamGenerateContent?alt=sse).

Point the real LiteLLM code at it: `LitellmModel("gemini/gemini-2.5-flash", base_url=stub.base_url,
api_key="test-key")`. With a custom base LiteLLM POSTs to `{base}/models/{model}:generateContent` and
`{base}/models/{model}:streamGenerateContent?alt=sse`, key in the `x-goog-api-key` header (see
litellm/llms/vertex_ai/vertex_llm_base.py `_check_custom_proxy`). The base is used verbatim, so it must
not end with a slash; the stub accepts any prefix before `/models/`.

Replies are scripted FIFO and shared by both endpoints; an empty script answers `default_text`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.servers import serve_in_thread

SECRET_MARKER = "SECRET-UPSTREAM-DETAIL"
"""Put into every scripted error message so tests can assert it never reaches end users."""

HEALTH_PATH = "/__stub/health"
_MODEL_PATH = re.compile(r"/models/(?P<model>[^/:]+):(?P<method>generateContent|streamGenerateContent)$")
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON (None if the body was not JSON)
    model: str | None
    stream: bool

    @property
    def contents(self) -> list[dict[str, Any]]:
        """The Gemini `contents` array (the conversation history sent)."""
        return list(self.body.get("contents", [])) if isinstance(self.body, dict) else []

    @property
    def roles(self) -> list[str]:
        return [str(c.get("role")) for c in self.contents]

    @property
    def parts(self) -> list[dict[str, Any]]:
        """All parts of all contents, flattened."""
        return [p for c in self.contents for p in c.get("parts", [])]

    @property
    def function_declarations(self) -> list[dict[str, Any]]:
        tools = self.body.get("tools", []) if isinstance(self.body, dict) else []
        return [d for t in tools for d in t.get("functionDeclarations", t.get("function_declarations", []))]

    @property
    def system_text(self) -> str:
        sys_ins = self.body.get("system_instruction") or self.body.get("systemInstruction") or {}
        return "".join(p.get("text", "") for p in sys_ins.get("parts", []))

    @property
    def api_key(self) -> str | None:
        return self.headers.get("x-goog-api-key") or self.query.get("key")


@dataclass
class Reply:
    kind: Literal["text", "calls", "error"]
    text: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    thought_signature: str | None = None
    input_tokens: int = 10
    output_tokens: int = 5
    reasoning_tokens: int = 0
    chunks: list[str] | None = None  # explicit stream pieces for text
    status_code: int = 200
    message: str = ""
    error_status: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before answering (simulates a slow upstream / timeout)
    chunk_delay: float = 0.0  # between SSE chunks

    def usage_metadata(self) -> dict[str, int]:
        usage = {
            "promptTokenCount": self.input_tokens,
            "candidatesTokenCount": self.output_tokens,
            "totalTokenCount": self.input_tokens + self.output_tokens + self.reasoning_tokens,
        }
        if self.reasoning_tokens:
            usage["thoughtsTokenCount"] = self.reasoning_tokens
        return usage


def _split_text(text: str) -> list[str]:
    """Word-sized pieces (keeping whitespace) so a stream consumer sees several deltas."""
    pieces = re.findall(r"\S+\s*|\s+", text)
    return pieces or [text]


class GeminiStub:
    """Serve a scripted fake Gemini API on 127.0.0.1 in a background thread.

    Use as a context manager; `base_url` is what to pass as LitellmModel(base_url=...)/MODEL_API_BASE.
    """

    def __init__(
        self,
        *,
        default_text: str = "stub default answer",
        expected_api_key: str | None = None,
        path_prefix: str = "/v1beta",
    ) -> None:
        self.default_text = default_text
        self.expected_api_key = expected_api_key
        self.path_prefix = path_prefix.rstrip("/")
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._counter = 0
        self._closing = threading.Event()
        self._stack: ExitStack | None = None
        self.root_url = ""
        self.app = Starlette(
            routes=[
                Route(HEALTH_PATH, self._health, methods=["GET"]),
                Route("/{rest:path}", self._handle, methods=["POST"]),
            ]
        )

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> GeminiStub:
        stack = ExitStack()
        self.root_url = stack.enter_context(serve_in_thread(self.app, health_path=HEALTH_PATH))
        self._closing.clear()
        self._stack = stack
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing.set()  # wake handlers sleeping in a scripted delay
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @property
    def base_url(self) -> str:
        """E.g. `http://127.0.0.1:PORT/v1beta` (no trailing slash: LiteLLM appends `/models/...`)."""
        if not self.root_url:
            raise RuntimeError("GeminiStub is not running; use it as a context manager")
        return self.root_url + self.path_prefix

    # --- script ----------------------------------------------------------------------------------
    def enqueue(self, reply: Reply) -> Reply:
        with self._lock:
            self._script.append(reply)
        return reply

    def reply_text(
        self,
        text: str,
        *,
        input_tokens: int = 10,
        output_tokens: int = 5,
        reasoning_tokens: int = 0,
        chunks: Sequence[str] | None = None,
        thought_signature: str | None = None,
        delay: float = 0.0,
        chunk_delay: float = 0.0,
    ) -> Reply:
        """A text answer. Streamed word by word unless `chunks` gives the pieces."""
        return self.enqueue(
            Reply(
                kind="text",
                text=text,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                reasoning_tokens=reasoning_tokens,
                chunks=list(chunks) if chunks is not None else None,
                thought_signature=thought_signature,
                delay=delay,
                chunk_delay=chunk_delay,
            )
        )

    def reply_function_call(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        more: Sequence[tuple[str, Mapping[str, Any]]] = (),
        text: str = "",
        thought_signature: str | None = None,
        input_tokens: int = 10,
        output_tokens: int = 5,
        delay: float = 0.0,
    ) -> Reply:
        """One reply with a functionCall part (plus one per `more` entry: parallel calls).

        `thought_signature` goes on the first functionCall part, as Gemini does.
        """
        calls = [(name, dict(args or {}))] + [(n, dict(a)) for n, a in more]
        return self.enqueue(
            Reply(
                kind="calls",
                text=text,
                calls=calls,
                thought_signature=thought_signature,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                delay=delay,
            )
        )

    def reply_function_calls(self, calls: Sequence[tuple[str, Mapping[str, Any]]], **kwargs: Any) -> Reply:
        (first_name, first_args), *rest = calls
        return self.reply_function_call(first_name, first_args, more=rest, **kwargs)

    def reply_error(
        self,
        status_code: int,
        message: str | None = None,
        *,
        status: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> Reply:
        """A Gemini-style error `{"error": {"code", "message", "status"}}`; the message carries SECRET_MARKER."""
        text = message or f"upstream failure {status_code}"
        if SECRET_MARKER not in text:
            text = f"{text} ({SECRET_MARKER})"
        return self.enqueue(
            Reply(
                kind="error",
                status_code=status_code,
                message=text,
                error_status=status or _GOOGLE_STATUS.get(status_code, "UNKNOWN"),
                headers=dict(headers or {}),
                delay=delay,
            )
        )

    def reply_delay(self, seconds: float, text: str = "late answer") -> Reply:
        """A text reply that only starts after `seconds` (use with a shorter client timeout)."""
        return self.reply_text(text, delay=seconds)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def pending(self) -> int:
        """Scripted replies not consumed yet."""
        with self._lock:
            return len(self._script)

    # --- HTTP ------------------------------------------------------------------------------------
    async def _health(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    def _next(self) -> tuple[int, Reply]:
        with self._lock:
            self._counter += 1
            reply = self._script.popleft() if self._script else Reply(kind="text", text=self.default_text)
            return self._counter, reply

    async def _sleep(self, seconds: float, request: Request) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._closing.is_set() and loop.time() < deadline:
            await asyncio.sleep(min(0.02, max(deadline - loop.time(), 0)))
            if await request.is_disconnected():
                return

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        route = self._route(request.url.path, body)
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            model=route[0] if route else None,
            stream=bool(route and route[1]),
        )
        with self._lock:
            self._requests.append(record)
        if route is None:
            return self._error(404, f"unknown path {request.url.path}", "NOT_FOUND")
        if self.expected_api_key is not None and self._api_key(record) != self.expected_api_key:
            return self._wrong_key()

        number, reply = self._next()
        if reply.delay:
            await self._sleep(reply.delay, request)
        if reply.kind == "error":
            return self._error(reply.status_code, reply.message, reply.error_status, reply.headers)
        model = record.model or "unknown"
        if not record.stream:
            return JSONResponse(self._full(reply, number, model))
        return StreamingResponse(
            self._sse(reply, number, model),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    # --- the protocol: what a subclass for another provider's REST API overrides -------------------
    def _route(self, path: str, body: Any) -> tuple[str, bool] | None:
        """(model, streamed) for a path this API serves, else None."""
        match = _MODEL_PATH.search(path)
        return (match["model"], match["method"] == "streamGenerateContent") if match else None

    def _api_key(self, record: RecordedRequest) -> str | None:
        return record.api_key

    def _wrong_key(self) -> Response:
        # What Google answers for a wrong key.
        return self._error(400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT")

    def _error(
        self, status_code: int, message: str, status: str | None, headers: Mapping[str, str] | None = None
    ) -> Response:
        return _error_response(status_code, message, status, headers)

    def _full(self, reply: Reply, number: int, model: str) -> dict[str, Any]:
        return _full_response(reply, number, model)

    def _chunks(self, reply: Reply, number: int, model: str) -> Iterator[dict[str, Any]]:
        return _stream_chunks(reply, number, model)

    _STREAM_END = b""  # what follows the last chunk

    async def _sse(self, reply: Reply, number: int, model: str) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(self._chunks(reply, number, model)):
            if i and reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        if self._STREAM_END:
            yield self._STREAM_END


def _error_response(
    status_code: int, message: str, status: str | None, headers: Mapping[str, str] | None = None
) -> Response:
    body = {"error": {"code": status_code, "message": message, "status": status or "UNKNOWN"}}
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))


def _parts(reply: Reply, text: str | None = None) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    text = reply.text if text is None else text
    if text:
        parts.append({"text": text})
    for i, (name, args) in enumerate(reply.calls):
        part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
        if i == 0 and reply.thought_signature:
            part["thoughtSignature"] = reply.thought_signature
        parts.append(part)
    if reply.kind == "text" and reply.thought_signature and parts:
        parts[-1]["thoughtSignature"] = reply.thought_signature
    return parts


def _envelope(
    parts: list[dict[str, Any]], number: int, model: str, *, finish: bool, usage: dict[str, int] | None
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = "STOP"
    body: dict[str, Any] = {"candidates": [candidate], "modelVersion": model, "responseId": f"stub-{number}"}
    if usage is not None:
        body["usageMetadata"] = usage
    return body


def _full_response(reply: Reply, number: int, model: str) -> dict[str, Any]:
    # usageMetadata is mandatory here: LiteLLM raises (as a 422) without it.
    return _envelope(_parts(reply), number, model, finish=True, usage=reply.usage_metadata())


def _stream_chunks(reply: Reply, number: int, model: str) -> Iterator[dict[str, Any]]:
    """Text in several chunks; function calls in one chunk; finishReason + usageMetadata last."""
    if reply.kind == "calls":
        yield _envelope(_parts(reply), number, model, finish=True, usage=reply.usage_metadata())
        return
    pieces = reply.chunks if reply.chunks is not None else _split_text(reply.text)
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        parts = [{"text": piece}]
        if i == last and reply.thought_signature:
            parts[0]["thoughtSignature"] = reply.thought_signature
        done = i == last
        yield _envelope(parts, number, model, finish=done, usage=reply.usage_metadata() if done else None)
