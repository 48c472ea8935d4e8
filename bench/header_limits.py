"""CPU cost of the HTTP protocol choices for the header limits (see backend/http_protocol.py).

Runs a trivial ASGI app under uvicorn with (a) stock httptools, which has no header limits, (b)
`LimitedHttpToolsProtocol` (this project's), (c) stock h11 with `h11_max_incomplete_event_size`
(its only limit), and prints the server process's CPU time per request for kept-alive connections
and for a new connection per request, with browser-sized request heads (~700 bytes, 12 headers).

    .venv/bin/python bench/header_limits.py [--requests 20000] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HEAD = (
    b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/130.0\r\n"
    b"Accept: application/json\r\nAccept-Language: en-US,en;q=0.9\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Authorization: Bearer " + b"x" * 300 + b"\r\nOrigin: http://localhost:3000\r\n"
    b"Referer: http://localhost:3000/chat\r\nX-Request-ID: 3f1c2a9e-7d55-4b8e-9a61-0c1d2e3f4a5b\r\n"
    b"Sec-Fetch-Mode: cors\r\nSec-Fetch-Site: same-site\r\nConnection: keep-alive\r\n\r\n"
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The least an app can do, so the protocol's own cost shows."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def serve(kind: str, port: int) -> None:
    import uvicorn

    common: dict[str, Any] = {"host": "127.0.0.1", "port": port, "log_level": "warning", "access_log": False}
    if kind == "limited":
        from backend.http_protocol import HeaderLimits
        from backend.server import ServerConfig

        config: uvicorn.Config = ServerConfig(app, header_limits=HeaderLimits(), **common)
    elif kind == "h11":
        config = uvicorn.Config(app, http="h11", h11_max_incomplete_event_size=16_384, **common)
    else:
        config = uvicorn.Config(app, http="httptools", **common)
    uvicorn.Server(config).run()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _read_response(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2)


async def _keep_alive(port: int, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        writer.write(HEAD)
        await _read_response(reader)
    writer.close()


async def _new_connections(port: int, count: int) -> None:
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD.replace(b"keep-alive", b"close"))
        await _read_response(reader)
        writer.close()


def measure(kind: str, requests: int, connections: int) -> tuple[float, float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)], cwd=root)  # noqa: S603
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        results = []
        for runner in (_keep_alive, _new_connections):
            per = requests // connections
            before = _cpu_seconds(proc.pid)

            async def load(run: Any = runner, each: int = per) -> None:
                await asyncio.gather(*(run(port, each) for _ in range(connections)))

            asyncio.run(load())
            results.append((_cpu_seconds(proc.pid) - before) / (per * connections) * 1e6)
        return results[0], results[1]
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="runs per protocol; the lowest is printed")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    print(
        f"server CPU per request (µs), {args.requests} requests, {args.connections} connections, best of {args.rounds}"
    )
    print(f"{'protocol':<32}{'kept alive':>12}{'new connection':>16}")
    for kind, label in (
        ("httptools", "httptools (stock, no limits)"),
        ("limited", "LimitedHttpToolsProtocol"),
        ("h11", "h11 (size limit only)"),
    ):
        runs = [measure(kind, args.requests, args.connections) for _ in range(args.rounds)]
        keep, new = min(r[0] for r in runs), min(r[1] for r in runs)
        print(f"{label:<32}{keep:>12.1f}{new:>16.1f}")


if __name__ == "__main__":
    main()
