"""Benchmark: the backend's own cost per turn through the real LiteLLM path, every figure of issue 11.

Starts three real processes on loopback: the OpenAI-protocol stub (bench/stub_llm.py, answering at
once, so only the backend's work counts), `chat-backend mcp`, and `chat-backend serve` with
`CHAT_MODEL=openai/bench` and `MODEL_API_BASE` on the stub, on a fresh database (created on the
PostgreSQL at DATABASE_URL's server, else 127.0.0.1:5432, migrated, dropped at the end). The per-user
turn limit is raised (not switched off, so its statements still run) and every conversation has a
user of its own, as in real traffic. The load generator is httpx in this process.

    .venv/bin/python bench/llm_path.py [--quick] [--profile]

CPU figures come from /proc/<pid>/stat (utime+stime, the whole process tree) of the API and the MCP
server; they are the robust ones on a shared machine. Wall-clock figures (throughput, latencies) move
with whatever else runs. `--profile` records the API and MCP processes with py-spy during each
figure (`--only cpu --profile`: the 20-concurrent one) and prints where the profiles were written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # one way to start and wait for processes: tests/support/servers.py

from backend.cli import migrate, mint_user_token  # noqa: E402
from backend.config import Settings  # noqa: E402
from backend.pgserver import tcp_reachable, with_database  # noqa: E402
from tests.support.servers import free_port, run_process, wait_http  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PY_SPY = str(next((p for p in [Path(sys.executable).parent / "py-spy"] if p.exists()), "py-spy"))
TOOL = "add task {i}"  # the stub calls add_task, then summarises its result: two model calls, one tool call


# --- measuring ------------------------------------------------------------------------------------------


def cpu_seconds(root: int) -> float:
    """CPU of `root` and its live descendants: each thread's time on a CPU from /proc/<pid>/task/*/schedstat
    (nanoseconds, where /proc/<pid>/stat counts 10 ms ticks), plus what reaped children used."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with suppress(OSError):
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0.0, [root]
    with suppress(OSError):
        stat = Path(f"/proc/{root}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(stat[13]) + int(stat[14])) / TICK  # cutime cstime: reaped children
    while todo:
        pid = todo.pop()
        with suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with suppress(OSError):
                    total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0]) / 1e9
        todo.extend(children.get(pid, []))
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Figure:
    figure: str
    value: str
    goal: str


class Report:
    def __init__(self) -> None:
        self.rows: list[Figure] = []

    def add(self, figure: str, value: str, goal: str = "") -> None:
        self.rows.append(Figure(figure, value, goal))
        print(f"  {figure}: {value}", flush=True)

    def table(self) -> str:
        head = Figure("figure", "value", "goal")
        widths = [max(len(getattr(r, f)) for r in [head, *self.rows]) for f in ("figure", "value", "goal")]
        lines = []
        for i, row in enumerate([head, *self.rows]):
            cells = [getattr(row, f).ljust(w) for f, w in zip(("figure", "value", "goal"), widths, strict=True)]
            lines.append("| " + " | ".join(cells) + " |")
            if i == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


# --- the stack ------------------------------------------------------------------------------------------


@dataclass
class Stack:
    base: str
    api: subprocess.Popen[bytes]
    mcp: subprocess.Popen[bytes]
    settings: Settings
    admin: str
    database: str
    tokens: dict[str, dict[str, str]]

    def auth(self, user: str) -> dict[str, str]:
        if user not in self.tokens:
            self.tokens[user] = {"Authorization": f"Bearer {mint_user_token(self.settings, user, 3600)}"}
        return self.tokens[user]

    def sql(self, statement: str, params: Any = None) -> None:
        conn = psycopg2.connect(with_database(self.admin, self.database).replace("+psycopg2", ""))
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement, params)
        finally:
            conn.close()


def admin_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url.replace("postgresql+psycopg2://", "postgresql://")
    if tcp_reachable("127.0.0.1", 5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    raise SystemExit("no PostgreSQL: set DATABASE_URL to a server this benchmark may create a database on")


@contextmanager
def stub(port: int) -> Iterator[None]:
    args = [sys.executable, str(ROOT / "bench" / "stub_llm.py"), "--port", str(port), "--chunk-per-word"]
    proc = subprocess.Popen(args)  # noqa: S603
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        # A hosted model is never cold: keep the stub's own first requests out of "first turn after start".
        for stream in (False, True):
            body = {"model": "bench", "messages": [{"role": "user", "content": "hello"}], "stream": stream}
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30).raise_for_status()
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def environment(database_url: str, stub_port: int, mcp_port: int, api_port: int) -> dict[str, str]:
    return {
        "APP_ENV": "production",
        "DATABASE_URL": database_url,
        "AUTH_SECRET": "bench-secret-" + "x" * 32,
        "MCP_TOKEN_SECRET": "bench-mcp-secret-" + "x" * 32,
        "CHAT_MODEL": "openai/bench",
        "MODEL_API_BASE": f"http://127.0.0.1:{stub_port}/v1",
        "MODEL_API_KEY": "sk-bench",
        "MCP_URL": f"http://127.0.0.1:{mcp_port}/mcp",
        "API_PORT": str(api_port),
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        # Raised, not off: the limit's statements run in every turn as they do in production.
        "USER_TURNS_PER_MINUTE": "1000000",
    }


# --- load -----------------------------------------------------------------------------------------------


@dataclass
class Load:
    turns: int
    errors: int
    wall: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.turns / self.wall

    def describe(self) -> str:
        ms = self.latencies or [0.0]
        return (
            f"{self.rate:.1f} turns/s, p50 {statistics.median(ms) / 1000:.2f} s, p99 {pct(ms, 0.99) / 1000:.2f} s, "
            f"errors {self.errors}/{self.turns}"
        )


_SSL = ssl.create_default_context()  # one for every client (each would build its own: ~20 ms of CPU)


async def conversations(stack: Stack, users: int, rounds: int, tag: str) -> Load:
    """`users` conversations (one user each) sending `rounds` turns at once, round after round.

    Each user is a client of its own with one connection, as people's browsers are. (One client with a
    pool of hundreds of connections cost the load generator ~15 ms of CPU per turn at 100-400 users:
    httpx walks its whole pool for every request. It shares the machine, so that was taken from the
    backend's figures.)"""
    headers = [stack.auth(f"{tag}-{i}") for i in range(users)]
    cids: list[str | None] = [None] * users
    latencies: list[float] = []
    errors = 0
    async with AsyncExitStack() as clients:
        one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        https = [
            await clients.enter_async_context(
                httpx.AsyncClient(base_url=stack.base, timeout=120, limits=one_connection, verify=_SSL)
            )
            for _ in range(users)
        ]

        async def one(i: int, r: int) -> None:
            nonlocal errors
            start = time.perf_counter()
            try:
                body = {"message": TOOL.format(i=f"{r} of {i}"), "conversation_id": cids[i]}
                response = await https[i].post("/api/chat", json=body, headers=headers[i])
            except httpx.HTTPError as exc:
                errors += 1
                print(f"    request failed: {exc!r}")
                return
            latencies.append((time.perf_counter() - start) * 1000)
            if response.status_code == 200:
                cids[i] = response.json()["conversation_id"]
            else:
                errors += 1
                if errors <= 3:
                    print(f"    {response.status_code}: {response.text[:200]}")

        start = time.perf_counter()
        for r in range(rounds):
            await asyncio.gather(*(one(i, r) for i in range(users)))
        wall = time.perf_counter() - start
    return Load(users * rounds, errors, wall, latencies)


async def chat(http: httpx.AsyncClient, stack: Stack, user: str, message: str, cid: str | None = None) -> str:
    response = await http.post("/api/chat", json={"message": message, "conversation_id": cid}, headers=stack.auth(user))
    response.raise_for_status()
    return str(response.json()["conversation_id"])


async def timed(work: Awaitable[Any]) -> float:
    start = time.perf_counter()
    await work
    return (time.perf_counter() - start) * 1000


async def api_cpu_ms(stack: Stack, work: Awaitable[Any]) -> float:
    before = cpu_seconds(stack.api.pid)
    await work
    return (cpu_seconds(stack.api.pid) - before) * 1000


# --- the figures ----------------------------------------------------------------------------------------


async def first_and_warm(stack: Stack, report: Report) -> None:
    async with httpx.AsyncClient(base_url=stack.base, timeout=120) as http:
        # The load generator's own first-time costs (minting its first token, connecting) stay out.
        stack.auth("first")
        (await http.get("/health")).raise_for_status()
        first = await timed(chat(http, stack, "first", TOOL.format(i="first")))
        warm = [await timed(chat(http, stack, "first", TOOL.format(i=i))) for i in range(7)]
    warm_ms = statistics.median(warm[2:])
    report.add(
        "first turn after start vs a warm turn (tool turn, wall)",
        f"{first:.0f} vs {warm_ms:.0f} ms ({first / warm_ms:.1f}×)",
        "≤ 3×",
    )


async def serial(stack: Stack, report: Report, n: int) -> None:
    async with httpx.AsyncClient(base_url=stack.base, timeout=120) as http:
        cid = await chat(http, stack, "serial", "hello")
        plain: list[float] = []
        tool: list[float] = []
        cpu = {"plain": 0.0, "tool": 0.0}
        for i in range(n):
            for kind, times, message in (("plain", plain, f"hello {i}"), ("tool", tool, f"preamble add serial {i}")):
                before = cpu_seconds(stack.api.pid) + cpu_seconds(stack.mcp.pid)
                times.append(await timed(chat(http, stack, "serial", message, cid)))
                cpu[kind] += cpu_seconds(stack.api.pid) + cpu_seconds(stack.mcp.pid) - before
    report.add(
        "serial turn p50, plain / one tool call",
        f"{statistics.median(plain):.1f} / {statistics.median(tool):.1f} ms",
        "≤ 15 / ≤ 25 ms",
    )
    report.add(
        "serial turn CPU, API + MCP, plain / one tool call",
        f"{cpu['plain'] / n * 1000:.1f} / {cpu['tool'] / n * 1000:.1f} ms",
        "(where the serial time goes)",
    )


async def floor(stub_url: str, report: Report, n: int) -> None:
    """What the Agents SDK and LiteLLM cost with none of the backend's work (bench/stack_floor.py)."""
    command = [sys.executable, str(ROOT / "bench" / "stack_floor.py"), "--stub-url", stub_url, "-n", str(n), "--json"]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    report.add(
        "floor: Agents SDK + LiteLLM in one process, tool / plain turn (no server, DB, MCP)",
        f"{figures['tool_turn_ms']:.1f} / {figures['plain_turn_ms']:.1f} ms CPU",
        "what ≤ 18 ms per turn has to fit over",
    )
    report.add(
        "floor: LiteLLM alone, one streamed chunk",
        f"{figures['litellm_stream_chunk_ms']:.3f} ms CPU",
        "what ≤ 0.3 ms per token has to fit over",
    )


def py_spy(pid: int, fmt: str, out: Path, rate: int) -> subprocess.Popen[bytes]:
    args = [PY_SPY, "record", "--nonblocking", "--pid", str(pid), "--rate", str(rate), "--format", fmt, "-o", str(out)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL)  # noqa: S603


@contextmanager
def profiling(stack: Stack, into: Path | None, phase: str, fmt: str, rate: int) -> Iterator[None]:
    """py-spy on the API and the MCP server while the block runs (nothing if `into` is None)."""
    if into is None:
        yield
        return
    suffix = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[fmt]
    processes = {"api": stack.api, "mcp": stack.mcp}
    spies = [py_spy(p.pid, fmt, into / f"{phase}-{name}.{suffix}", rate) for name, p in processes.items()]
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        print(f"  profiles of the API and MCP processes: {into}/{phase}-*.{suffix}")


async def cpu_per_turn(stack: Stack, report: Report, rounds: int) -> None:
    await conversations(stack, 20, 1, "c20")  # each user's first turn (new conversation) out of the figure
    api0, mcp0 = cpu_seconds(stack.api.pid), cpu_seconds(stack.mcp.pid)
    load = await conversations(stack, 20, rounds, "c20")
    api, mcp = (cpu_seconds(stack.api.pid) - api0) * 1000, (cpu_seconds(stack.mcp.pid) - mcp0) * 1000
    n = load.turns
    report.add(
        "CPU per turn, API + MCP, 20 concurrent (tool turns)",
        f"{(api + mcp) / n:.1f} ms (API {api / n:.1f}, MCP {mcp / n:.1f}; {load.rate:.1f} turns/s)",
        "≤ 18 ms",
    )


async def streamed_token(stack: Stack, report: Report, big: int, reps: int) -> None:
    async def stream(words: int) -> int:
        tokens = 0
        body = {"message": f"say {words} words"}
        async with http.stream("POST", "/api/chat/stream", json=body, headers=stack.auth("stream")) as response:
            async for line in response.aiter_lines():
                if line.startswith('data: {"type":"token"'):
                    tokens += 1
        return tokens

    async def measure(words: int) -> tuple[float, float, int]:
        cpu0, start = cpu_seconds(stack.api.pid), time.perf_counter()
        tokens = await stream(words)
        return (cpu_seconds(stack.api.pid) - cpu0) * 1000, (time.perf_counter() - start) * 1000, tokens

    async with httpx.AsyncClient(base_url=stack.base, timeout=120) as http:
        await stream(big)
        small = [await measure(10) for _ in range(reps)]
        large = [await measure(big) for _ in range(reps)]
    small_cpu, small_wall, small_n = (
        statistics.mean(m[0] for m in small),
        statistics.median(m[1] for m in small),
        small[0][2],
    )
    big_cpu, big_wall, big_n = statistics.mean(m[0] for m in large), statistics.median(m[1] for m in large), large[0][2]
    per_cpu = (big_cpu - small_cpu) / (big_n - small_n)
    per_wall = (big_wall - small_wall) / (big_n - small_n)
    report.add(
        "streamed token, added by the backend (API CPU / wall)",
        f"{per_cpu:.3f} / {per_wall:.3f} ms ({big_n} vs {small_n} tokens)",
        "≤ 0.3 ms",
    )


async def long_answer(stack: Stack, report: Report, reps: int) -> None:
    async with httpx.AsyncClient(base_url=stack.base, timeout=120) as http:
        await chat(http, stack, "long", "say 1500 words")
        small = [await api_cpu_ms(stack, chat(http, stack, "long", "say 10 words")) for _ in range(reps)]
        big = [await api_cpu_ms(stack, chat(http, stack, "long", "say 1500 words")) for _ in range(reps)]
    small_ms, big_ms = statistics.mean(small), statistics.mean(big)
    report.add(
        "POST /api/chat API CPU, 1500-word vs 10-word answer",
        f"{big_ms:.1f} vs {small_ms:.1f} ms ({big_ms / small_ms:.1f}×)",
        "within 2×",
    )


SEED = """
WITH c AS (
    INSERT INTO conversation (id, user_id, title, created_at, updated_at, last_seq, message_count)
    SELECT gen_random_uuid(), %(user)s, 'seeded ' || i, now(), now() - i * interval '1 second', %(n)s, %(n)s
    FROM generate_series(1, %(conversations)s) AS i
    RETURNING id
)
INSERT INTO message (id, conversation_id, user_id, seq, role, content, status, tool_calls, completed_answers,
                     reply_to, created_at)
SELECT gen_random_uuid(), c.id, %(user)s, s, CASE WHEN s %% 2 = 1 THEN 'user' ELSE 'assistant' END,
       'seeded message ' || s, 'complete', '[]'::jsonb, 0, NULL, now()
FROM c, generate_series(1, %(n)s) AS s
"""


async def listing(stack: Stack, report: Report, reps: int) -> None:
    stack.sql(SEED, {"user": "list-small", "conversations": 20, "n": 2})
    stack.sql(SEED, {"user": "list-big", "conversations": 20, "n": 5000})
    stack.sql("ANALYZE")
    async with httpx.AsyncClient(base_url=stack.base, timeout=120) as http:

        async def get(user: str) -> None:
            response = await http.get("/api/conversations", params={"limit": 20}, headers=stack.auth(user))
            response.raise_for_status()
            assert len(response.json()["data"]) == 20

        for user in ("list-small", "list-big"):
            await get(user)
        small = [await timed(get("list-small")) for _ in range(reps)]
        big = [await timed(get("list-big")) for _ in range(reps)]
    report.add(
        "GET /api/conversations (20), 2 vs 5,000 messages each, p50",
        f"{statistics.median(small):.1f} vs {statistics.median(big):.1f} ms",
        "≤ 2×, flat",
    )


async def long_conversation(stack: Stack, report: Report, reps: int) -> None:
    """A 10,000-message conversation against one of 40 (HISTORY_MAX_MESSAGES: the model sees the
    same window of both), so only what data size costs the backend differs."""
    stack.sql(SEED, {"user": "long-conv", "conversations": 1, "n": 10_000})
    stack.sql(SEED, {"user": "window-conv", "conversations": 1, "n": 40})
    async with httpx.AsyncClient(base_url=stack.base, timeout=120) as http:
        ids = []
        for user in ("long-conv", "window-conv"):
            response = await http.get("/api/conversations", headers=stack.auth(user))
            ids.append((user, response.json()["data"][0]["id"]))
        (old_user, old), (new_user, new) = ids
        for user, cid in ids:
            await chat(http, stack, user, "hello", cid)
        cpu_old = [await api_cpu_ms(stack, chat(http, stack, old_user, "hello", old)) for _ in range(reps)]
        cpu_new = [await api_cpu_ms(stack, chat(http, stack, new_user, "hello", new)) for _ in range(reps)]
        wall_old = [await timed(chat(http, stack, old_user, "hello", old)) for _ in range(reps)]
        wall_new = [await timed(chat(http, stack, new_user, "hello", new)) for _ in range(reps)]
    report.add(
        "plain turn, 10,000-message vs 40-message conversation (API CPU; wall p50)",
        f"{statistics.mean(cpu_old):.1f} vs {statistics.mean(cpu_new):.1f} ms; "
        f"{statistics.median(wall_old):.1f} vs {statistics.median(wall_new):.1f} ms",
        "the same",
    )


async def throughput(stack: Stack, report: Report, label: str, sizes: tuple[int, int, int], big: int) -> None:
    users, rounds = sizes[0], sizes[1]
    await conversations(stack, 10, 1, f"warm-{label}")
    for count, rounds_, goal in (
        (users, rounds, "≥ 45 turns/s, p99 ≤ 3 s, 0 errors"),
        (big, sizes[2], "0 errors, p99 ≤ 12 s"),
    ):
        # The load generator shares the machine: its own CPU per turn says how much it takes.
        own = time.process_time()
        load = await conversations(stack, count, rounds_, f"t{count}-{label}")
        own_ms = (time.process_time() - own) / load.turns * 1000
        turns = "turns" if rounds_ > 1 else "turn"
        report.add(
            f"{count} concurrent × {rounds_} {turns}, {label}",
            f"{load.describe()}; load generator {own_ms:.0f} ms CPU/turn",
            goal,
        )


# --- running --------------------------------------------------------------------------------------------


@contextmanager
def api(env: dict[str, str], workers: int, api_port: int) -> Iterator[subprocess.Popen[bytes]]:
    with run_process(
        ["serve"], {**env, "WEB_CONCURRENCY": str(workers)}, f"http://127.0.0.1:{api_port}/health"
    ) as proc:
        yield proc


PHASES = ("first", "serial", "cpu", "stream", "long-answer", "listing", "long-conversation", "floor", "throughput")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a sanity run of a minute or so")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the API and MCP processes during each figure (see --only)"
    )
    parser.add_argument("--profile-format", choices=["flamegraph", "speedscope", "raw"], default="flamegraph")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--only", help=f"comma-separated figures to run, of: {', '.join(PHASES)}")
    parser.add_argument("--repeat", type=int, default=1, help="run each figure this many times (for before/after)")
    args = parser.parse_args()
    quick = args.quick
    only = set(args.only.split(",")) if args.only else set()
    if only - set(PHASES):
        parser.error(f"--only: unknown {', '.join(sorted(only - set(PHASES)))}")

    admin = admin_url()
    database = f"chat_llmbench_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{database}"')
    stub_port, mcp_port, api_port = free_port(), free_port(), free_port()
    env = environment(with_database(admin, database), stub_port, mcp_port, api_port)
    settings = Settings(_env_file=None, database_url=env["DATABASE_URL"], auth_secret=env["AUTH_SECRET"])  # type: ignore[call-arg]
    profile = Path(tempfile.mkdtemp(prefix="llm-path-profile-")) if args.profile else None
    report = Report()
    try:
        migrate(settings)
        with (
            stub(stub_port),
            run_process(["mcp"], env, f"http://127.0.0.1:{mcp_port}/health") as mcp,
        ):
            print(f"stack: LiteLLM openai/bench -> stub, PostgreSQL {admin.split('@')[-1]}, {os.cpu_count()} cores")
            print("API with WEB_CONCURRENCY=1:")
            with api(env, 1, api_port) as proc:
                stack = Stack(f"http://127.0.0.1:{api_port}", proc, mcp, settings, admin, database, {})

                phases: dict[str, Callable[[], Awaitable[None]]] = {
                    "first": lambda: first_and_warm(stack, report),
                    "serial": lambda: serial(stack, report, 8 if quick else 30),
                    "cpu": lambda: cpu_per_turn(stack, report, 3 if quick else 10),
                    "stream": lambda: streamed_token(stack, report, 1000 if quick else 2000, 3 if quick else 6),
                    "long-answer": lambda: long_answer(stack, report, 4 if quick else 10),
                    "listing": lambda: listing(stack, report, 20 if quick else 50),
                    "long-conversation": lambda: long_conversation(stack, report, 4 if quick else 10),
                    "floor": lambda: floor(env["MODEL_API_BASE"], report, 50 if quick else 200),
                    "throughput": lambda: throughput(
                        stack, report, "1 worker", (40, 2, 1) if quick else (100, 3, 1), 120 if quick else 400
                    ),
                }

                async def one_worker() -> None:
                    for name, phase in phases.items():
                        if not only or name in only:
                            for _ in range(args.repeat):
                                with profiling(stack, profile, name, args.profile_format, args.profile_rate):
                                    await phase()

                asyncio.run(one_worker())
            workers = settings.workers
            if workers > 1 and (not only or "throughput" in only):
                print(f"API with the default workers ({workers}):")
                with api(env, workers, api_port) as proc:
                    stack = Stack(f"http://127.0.0.1:{api_port}", proc, mcp, settings, admin, database, {})
                    label = f"{workers} workers"
                    sizes = (40, 2, 1) if quick else (100, 3, 1)
                    asyncio.run(throughput(stack, report, label, sizes, 120 if quick else 400))
    finally:
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        conn.close()
    print()
    print(report.table())


if __name__ == "__main__":
    main()
