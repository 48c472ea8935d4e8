"""Benchmark: chat-turn latency and throughput of the real stack on loopback, offline model.

Starts `chat-backend mcp` and `chat-backend serve` as processes on a fresh database (DATABASE_URL's
server, else 127.0.0.1:5432, else the embedded PostgreSQL), then measures:

- sequential `POST /api/chat` turns (p50/p95/max), tool-using and plain;
- time to first token and to `complete` on `POST /api/chat/stream`;
- N concurrent conversations, one turn each, several rounds (throughput, p50/p95, errors);
- `GET /api/conversations` and `GET /api/conversations/{id}` latency with data in the tables.

    .venv/bin/python bench/turns.py [--turns 50] [--concurrency 100] [--rounds 3]

The offline model answers in microseconds, so these numbers are the backend's own overhead
(auth, PostgreSQL, agent construction, the MCP round trips); a real model adds its own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # one way to start and wait for processes: tests/support/servers.py

from backend.cli import migrate, mint_user_token  # noqa: E402
from backend.config import Settings  # noqa: E402
from backend.pgserver import start_embedded, tcp_reachable, with_database  # noqa: E402
from tests.support.servers import free_port, wait_http  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(name: str, ms: list[float]) -> None:
    print(
        f"  {name:<38} n={len(ms):<4} p50={statistics.median(ms):7.1f} ms  "
        f"p95={pct(ms, 0.95):7.1f} ms  max={max(ms):7.1f} ms"
    )


def server_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    if tcp_reachable("127.0.0.1", 5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    return start_embedded(ROOT / ".data" / "bench")


async def sequential(http: httpx.AsyncClient, headers: dict[str, str], turns: int) -> None:
    tool_ms: list[float] = []
    plain_ms: list[float] = []
    cid = None
    for i in range(turns):
        message = f"add bench task {i}" if i % 2 == 0 else "hello"
        start = time.perf_counter()
        response = await http.post("/api/chat", json={"message": message, "conversation_id": cid}, headers=headers)
        elapsed = (time.perf_counter() - start) * 1000
        response.raise_for_status()
        cid = response.json()["conversation_id"]
        (tool_ms if i % 2 == 0 else plain_ms).append(elapsed)
    summary("POST /api/chat, tool turn (add_task)", tool_ms)
    summary("POST /api/chat, plain turn", plain_ms)


async def streaming(http: httpx.AsyncClient, headers: dict[str, str], turns: int) -> None:
    first: list[float] = []
    done: list[float] = []
    gaps: list[float] = []
    for i in range(turns):
        start = time.perf_counter()
        last = None
        async with http.stream("POST", "/api/chat/stream", json={"message": f"add streamed {i}"}, headers=headers) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                kind = json.loads(line[6:])["type"]
                if kind == "token":
                    if last is None:
                        first.append((now - start) * 1000)
                    else:
                        gaps.append((now - last) * 1000)
                    last = now
                elif kind == "complete":
                    done.append((now - start) * 1000)
    summary("stream: time to first token", first)
    summary("stream: time between tokens", gaps)
    summary("stream: time to complete", done)


async def concurrent(base: str, settings: Settings, users: int, rounds: int) -> None:
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        tokens = [{"Authorization": f"Bearer {mint_user_token(settings, f'bench-{i}', 3600)}"} for i in range(users)]
        cids: list[str | None] = [None] * users
        all_ms: list[float] = []
        errors = 0
        wall = 0.0

        async def one(i: int, r: int) -> None:
            nonlocal errors
            start = time.perf_counter()
            try:
                response = await http.post(
                    "/api/chat",
                    json={"message": f"add task {r} of user {i}", "conversation_id": cids[i]},
                    headers=tokens[i],
                )
            except httpx.HTTPError as exc:
                print(f"  request failed: {exc!r} round={r} after={time.perf_counter() - start:.2f}s")
                errors += 1
                return
            all_ms.append((time.perf_counter() - start) * 1000)
            if response.status_code != 200:
                errors += 1
            else:
                cids[i] = response.json()["conversation_id"]

        for r in range(rounds):
            start = time.perf_counter()
            await asyncio.gather(*(one(i, r) for i in range(users)))
            wall += time.perf_counter() - start
        summary(f"{users} concurrent conversations, per turn", all_ms)
        print(f"  {'throughput':<38} {len(all_ms) / wall:7.1f} turns/s over {rounds} rounds, errors={errors}")


async def reads(http: httpx.AsyncClient, headers: dict[str, str]) -> None:
    listing: list[float] = []
    detail: list[float] = []
    page = (await http.get("/api/conversations", headers=headers)).json()
    cid = page["data"][0]["id"]
    for _ in range(50):
        start = time.perf_counter()
        (await http.get("/api/conversations", params={"limit": 50}, headers=headers)).raise_for_status()
        listing.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        (await http.get(f"/api/conversations/{cid}", headers=headers)).raise_for_status()
        detail.append((time.perf_counter() - start) * 1000)
    summary("GET /api/conversations?limit=50", listing)
    summary("GET /api/conversations/{id} (50 msgs)", detail)


async def run(args: argparse.Namespace, base: str, settings: Settings) -> None:
    headers = {"Authorization": f"Bearer {mint_user_token(settings, 'bench-solo', 3600)}"}
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        await sequential(http, headers, 10)  # warm-up
        print("sequential turns (one conversation):")
        await sequential(http, headers, args.turns)
        print("streaming turns:")
        await streaming(http, headers, max(10, args.turns // 2))
        print("reads:")
        await reads(http, headers)
    print("concurrency:")
    await concurrent(base, settings, args.concurrency, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    admin = server_url().replace("postgresql+psycopg2://", "postgresql://")
    name = f"chat_bench_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{name}"')
    mcp_port, api_port = free_port(), free_port()
    env = {
        **os.environ,
        "APP_ENV": "production",
        "DATABASE_URL": with_database(admin, name),
        "AUTH_SECRET": "bench-secret-" + "x" * 32,
        "MCP_TOKEN_SECRET": "bench-mcp-secret-" + "x" * 32,
        "CHAT_MODEL": "offline",
        "MCP_URL": f"http://127.0.0.1:{mcp_port}/mcp",
        "API_PORT": str(api_port),
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
    }
    settings = Settings(_env_file=None, database_url=env["DATABASE_URL"], auth_secret=env["AUTH_SECRET"])  # type: ignore[call-arg]
    migrate(settings)
    procs = [
        subprocess.Popen([sys.executable, "-m", "backend.cli", cmd], env=env)  # noqa: S603
        for cmd in ("mcp", "serve")
    ]
    try:
        wait_http(f"http://127.0.0.1:{mcp_port}/health", proc=procs[0])
        wait_http(f"http://127.0.0.1:{api_port}/health", proc=procs[1])
        print(f"stack: offline model, PostgreSQL {admin.split('@')[-1]}, {os.cpu_count()} cores")
        asyncio.run(run(args, f"http://127.0.0.1:{api_port}", settings))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=15)
        conn.cursor().execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.close()


if __name__ == "__main__":
    main()
