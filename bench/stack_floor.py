"""Benchmark: the floor the required stack sets, with none of the backend's own work.

The same agent the API builds (instructions, model settings, LiteLLM model from `agent/factory`) run
in this process by the Agents SDK's `Runner`, against the OpenAI-protocol stub, with a local no-op
`add_task` tool: no HTTP server, no database, no MCP server, no turn bookkeeping. What it costs is
what any backend built on the Agents SDK and LiteLLM pays per turn before doing anything of its own;
`llm_path.py` compares its figures against this.

    .venv/bin/python bench/stack_floor.py [--stub-url http://127.0.0.1:PORT/v1] [--json]

Without `--stub-url` it starts `bench/stub_llm.py` itself. CPU is this process's (time.process_time),
serial calls, after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents import Agent, Runner, function_tool  # noqa: E402

from backend.agent.factory import INSTRUCTIONS, make_model, model_settings, run_config, warm_up  # noqa: E402
from backend.config import Settings  # noqa: E402
from tests.support.servers import free_port, wait_http  # noqa: E402


@function_tool
def add_task(title: str) -> dict[str, Any]:
    """Add a task to the user's list."""
    return {"task_id": 1, "status": "created", "title": title}


@contextmanager
def own_stub() -> Iterator[str]:
    port = free_port()
    args = [sys.executable, str(ROOT / "bench" / "stub_llm.py"), "--port", str(port), "--chunk-per-word"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def cpu_ms(work: Callable[[], Awaitable[Any]], n: int) -> float:
    for _ in range(max(n // 10, 5)):
        await work()
    start = time.process_time()
    for _ in range(n):
        await work()
    return (time.process_time() - start) / n * 1000


async def measure(base_url: str, n: int) -> dict[str, float]:
    settings = Settings(_env_file=None, chat_model="openai/bench", model_api_base=base_url, model_api_key="bench")  # type: ignore[call-arg]
    await warm_up(settings)
    import litellm

    model = make_model(settings)
    config = run_config(settings)

    def agent() -> Agent[Any]:
        return Agent(
            name="Task assistant",
            instructions=INSTRUCTIONS,
            model=model,
            model_settings=model_settings(settings),
            tools=[add_task],
        )

    async def turn(message: str) -> None:
        await Runner.run(agent(), message, run_config=config)

    async def completion() -> None:
        messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": "hello"}]
        await litellm.acompletion(model="openai/bench", messages=messages, api_base=base_url, api_key="bench")

    async def stream(words: int) -> None:
        messages = [{"role": "user", "content": f"say {words} words"}]
        response = await litellm.acompletion(
            model="openai/bench", messages=messages, api_base=base_url, api_key="bench", stream=True
        )
        async for _ in response:
            pass

    long_stream, short_stream = await cpu_ms(lambda: stream(1000), 3), await cpu_ms(lambda: stream(10), 3)
    return {
        "tool_turn_ms": await cpu_ms(lambda: turn("add task floor"), n),
        "plain_turn_ms": await cpu_ms(lambda: turn("hello"), n),
        "litellm_call_ms": await cpu_ms(completion, n),
        "litellm_stream_chunk_ms": (long_stream - short_stream) / 990,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stub-url", help="an OpenAI-protocol stub already running (with --chunk-per-word)")
    parser.add_argument("-n", type=int, default=200, help="turns per figure")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    if args.stub_url:
        figures = asyncio.run(measure(args.stub_url, args.n))
    else:
        with own_stub() as url:
            figures = asyncio.run(measure(url, args.n))
    if args.json:
        print(json.dumps(figures))
        return
    lines = {
        "Agents SDK + LiteLLM in process, tool turn (2 model calls, a no-op tool)": f"{figures['tool_turn_ms']:.1f} ms",
        "Agents SDK + LiteLLM in process, plain turn (1 model call)": f"{figures['plain_turn_ms']:.1f} ms",
        "litellm.acompletion alone, one call": f"{figures['litellm_call_ms']:.1f} ms",
        "litellm.acompletion alone, one streamed chunk": f"{figures['litellm_stream_chunk_ms']:.3f} ms",
    }
    for label, value in lines.items():
        print(f"{label}: {value} CPU")


if __name__ == "__main__":
    main()
