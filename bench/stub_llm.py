"""Deterministic OpenAI-compatible chat-completions stub for load tests.

Speaks just enough of the OpenAI protocol for LiteLLM / the openai SDK / the
OpenAI Agents SDK: POST /v1/chat/completions (non-streaming JSON, or SSE when
"stream": true, ending in "data: [DONE]"), plus GET /v1/models, /health and
/stats (request counters).

Script (looks only at the request, keeps no conversation state):
  * a "tool" message after the last user message -> short final text that
    summarises that tool result;
  * last user message says add/create X -> tool call add_task {"title": X};
  * last user message says list/show    -> tool call list_tasks {"status": "all"};
  * "preamble add X" -> the same tool call with the text "Sure, on it." before it;
  * "say N words" -> N words of text (one chunk each with --chunk-per-word);
  * anything else                       -> a plain text reply.
A tool call is only made if the request offers a tool of that name.  If the
tool's schema has a user_id parameter it is filled from a `user_id` /
`User ID: ...` mention (system prompt first, then user messages).

Backends that put history and the new message into one user message (e.g.
"Recent conversation: ... Current user message: add task 3") are handled:
only the text after the last "... user message:" marker is interpreted.

Run:  python stub_llm.py --port 9100 [--latency-ms 0]
Point a client at it with base URL http://127.0.0.1:9100/v1 (any API key).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import time
from collections import Counter
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

app = FastAPI(title="stub-llm", docs_url=None, redoc_url=None, openapi_url=None)

LATENCY_S = 0.0
STREAM_USAGE_ALWAYS = False
CHUNK_PER_WORD = False
_ids = itertools.count(1)
STATS: Counter[str] = Counter()

_MARKER = re.compile(r"(?:current\s+)?user\s+message\s*:\s*", re.IGNORECASE)
_ADD = re.compile(r"\b(?:add|create)\b\s*(.*)", re.IGNORECASE | re.DOTALL)
_LIST = re.compile(r"\b(?:list|show)\b", re.IGNORECASE)
_USER_ID = [
    re.compile(r"user[ _]id\W{0,3}\s*[:=]\s*[\"']?([A-Za-z0-9_.@:\-]+)", re.IGNORECASE),
    re.compile(r"\"user_id\"\s*:\s*\"([^\"]+)\""),
]


# --------------------------------------------------------------------------- helpers
def _text(content: Any) -> str:
    """Message content may be a string or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict):
                parts.append(str(p.get("text") or p.get("content") or ""))
            else:
                parts.append(str(p))
        return "\n".join(parts)
    return str(content)


def _current_user_text(raw: str) -> str:
    """Strip an embedded history/context block, keep the newest user utterance."""
    matches = list(_MARKER.finditer(raw))
    if matches:
        return raw[matches[-1].end() :].strip()
    return raw.strip()


def _find_user_id(messages: list[dict]) -> str | None:
    ordered = [m for m in messages if m.get("role") in ("system", "developer")]
    ordered += [m for m in reversed(messages) if m.get("role") == "user"]
    for m in ordered:
        txt = _text(m.get("content"))
        for rx in _USER_ID:
            hit = rx.search(txt)
            if hit:
                return hit.group(1).rstrip(".,;)")
    return None


def _tool_schemas(body: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for t in body.get("tools") or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if fn and fn.get("name"):
            out[fn["name"]] = fn.get("parameters") or {}
    for fn in body.get("functions") or []:  # legacy field
        if fn.get("name"):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


def _clean_title(rest: str) -> str:
    title = rest.strip().splitlines()[0] if rest.strip() else ""
    title = re.sub(r"^(?:a|an|new|the)\s+", "", title, flags=re.IGNORECASE)
    title = re.sub(r"^(?:new\s+)?task\s+(?:called|named|titled|to|:)\s*", "", title, flags=re.IGNORECASE)
    title = title.strip().strip("\"'“”‘’").rstrip(".!?").strip()
    return title[:200] or "untitled"


def _summarise_tool_result(name: str, content: str) -> str:
    try:
        data = json.loads(content)
    except (ValueError, TypeError):
        data = None
    # MCP results are often wrapped: {"type":"text","text":"..."} or a list of those
    if isinstance(data, dict) and data.get("type") == "text" and "text" in data:
        try:
            data = json.loads(data["text"])
        except (ValueError, TypeError):
            data = data["text"]
    if isinstance(data, list):
        return f"{name}: {len(data)} item(s)."
    if isinstance(data, dict):
        title = data.get("title")
        tid = data.get("task_id", data.get("id"))
        status = data.get("status")
        bits = [b for b in (status, f"#{tid}" if tid is not None else None, f"'{title}'" if title else None) if b]
        if bits:
            return f"{name}: " + " ".join(str(b) for b in bits) + "."
    snippet = (content or "").replace("\n", " ")[:120]
    return f"{name} returned: {snippet}"


def decide(body: dict) -> dict:
    """Return {'text': str} or {'tool': name, 'arguments': dict}."""
    messages = body.get("messages") or []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    after = messages[last_user + 1 :]
    tool_msgs = [m for m in after if m.get("role") in ("tool", "function")]
    if tool_msgs:
        last = tool_msgs[-1]
        # name of the tool: from the assistant tool_call with the same id, if any
        name = last.get("name") or "tool"
        for m in after:
            for tc in m.get("tool_calls") or []:
                if tc.get("id") == last.get("tool_call_id"):
                    name = (tc.get("function") or {}).get("name", name)
        return {"text": "Done. " + _summarise_tool_result(name, _text(last.get("content")))}

    user_text = _current_user_text(_text(messages[last_user].get("content"))) if last_user >= 0 else ""
    preamble = None
    if user_text.startswith("preamble "):
        # a model that says something before calling a tool (Gemini and others do)
        user_text, preamble = user_text[len("preamble ") :], "Sure, on it."
    tools = _tool_schemas(body)
    call: tuple[str, dict] | None = None
    m = _ADD.search(user_text)
    if m and "add_task" in tools:
        call = ("add_task", {"title": _clean_title(m.group(1))})
    elif _LIST.search(user_text) and "list_tasks" in tools:
        call = ("list_tasks", {"status": "all"})
    say = re.search(r"\bsay (\d+) words\b", user_text)
    if call is None and say:
        return {"text": " ".join(f"w{i}" for i in range(min(int(say.group(1)), 100_000)))}
    if call is None:
        return {"text": f"Hello! You said: {user_text[:80]}" if user_text else "Hello!"}

    name, args = call
    schema = tools[name] or {}
    props = schema.get("properties") or {}
    required = schema.get("required") or []
    if "user_id" in props or "user_id" in required:
        uid = _find_user_id(messages)
        if uid is not None or "user_id" in required:
            args = {"user_id": uid or "unknown-user", **args}
    if "status" in args and props and "status" not in props:
        args.pop("status")
    return {"tool": name, "arguments": args, **({"preamble": preamble} if preamble else {})}


def _usage(body: dict, completion_text: str) -> dict:
    prompt_chars = sum(len(_text(m.get("content"))) for m in body.get("messages") or [])
    prompt_chars += len(json.dumps(body.get("tools") or []))
    p = max(1, prompt_chars // 4)
    c = max(1, len(completion_text) // 4)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# --------------------------------------------------------------------------- routes
@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@app.get("/stats")
async def stats() -> dict:
    return dict(STATS)


@app.get("/v1/models")
async def models() -> dict:
    return {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "stub"}]}


@app.post("/v1/chat/completions")
@app.post("/chat/completions")
async def chat_completions(request: Request):
    body = await request.json()
    if LATENCY_S:
        await asyncio.sleep(LATENCY_S)
    d = decide(body)
    n = next(_ids)
    cid = f"chatcmpl-stub-{n}"
    created = int(time.time())
    model = body.get("model") or "stub"
    stream = bool(body.get("stream"))
    STATS["requests"] += 1
    STATS["stream" if stream else "non_stream"] += 1
    STATS["tool_call:" + d["tool"] if "tool" in d else "text"] += 1

    if "tool" in d:
        args_json = json.dumps(d["arguments"])
        tool_call = {
            "id": f"call_stub_{n}",
            "type": "function",
            "function": {"name": d["tool"], "arguments": args_json},
        }
        usage = _usage(body, args_json)
        message = {"role": "assistant", "content": d.get("preamble"), "tool_calls": [tool_call]}
        finish = "tool_calls"
    else:
        usage = _usage(body, d["text"])
        message = {"role": "assistant", "content": d["text"]}
        finish = "stop"

    if not stream:
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": usage,
            }
        )

    include_usage = STREAM_USAGE_ALWAYS or bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        obj = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        obj.update(extra)
        return "data: " + json.dumps(obj) + "\n\n"

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        if "tool" in d:
            if d.get("preamble"):
                yield chunk({"content": d["preamble"]})
            tc = message["tool_calls"][0]
            yield chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": tc["id"],
                            "type": "function",
                            "function": {"name": tc["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": tc["function"]["arguments"]}}]})
        else:
            words = d["text"].split(" ")
            if CHUNK_PER_WORD:
                for i, w in enumerate(words):
                    yield chunk({"content": (" " if i else "") + w})
            else:
                half = max(1, len(words) // 2)
                yield chunk({"content": " ".join(words[:half])})
                if words[half:]:
                    yield chunk({"content": " " + " ".join(words[half:])})
        yield chunk({}, finish)
        if include_usage:
            yield (
                "data: "
                + json.dumps(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
                + "\n\n"
            )
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def main() -> None:
    global LATENCY_S, STREAM_USAGE_ALWAYS, CHUNK_PER_WORD
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every completion")
    ap.add_argument(
        "--stream-usage",
        choices=["requested", "always"],
        default="requested",
        help="streaming: send the usage chunk only when stream_options.include_usage "
        "is set (OpenAI behaviour, default) or always",
    )
    ap.add_argument(
        "--chunk-per-word",
        action="store_true",
        help="streaming: one chunk per word (to measure per-token cost downstream)",
    )
    ap.add_argument("--access-log", action="store_true", help="enable uvicorn access log (off by default)")
    a = ap.parse_args()
    LATENCY_S = max(0.0, a.latency_ms) / 1000.0
    STREAM_USAGE_ALWAYS = a.stream_usage == "always"
    CHUNK_PER_WORD = a.chunk_per_word
    import uvicorn

    uvicorn.run(app, host=a.host, port=a.port, access_log=a.access_log, log_level="warning")


if __name__ == "__main__":
    main()
