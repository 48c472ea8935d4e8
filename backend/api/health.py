"""Liveness (`/health`) and readiness (`/health/ready`: the database and the MCP server answer)."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from backend import __version__
from backend.db import ping
from backend.deps import EngineDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


async def _mcp_ready(request: Request, url: str) -> bool:
    client: httpx.AsyncClient = request.app.state.http
    try:
        response = await client.get(url, timeout=2.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


@router.get("/health/ready", responses={503: {"description": "a dependency is unreachable"}})
async def ready(request: Request, engine: EngineDep, settings: SettingsDep) -> JSONResponse:
    checks: dict[str, Any] = {
        "database": await run_in_threadpool(ping, engine),
        "mcp": await _mcp_ready(request, settings.mcp_base_url + "/health"),
    }
    ok = all(checks.values())
    body = {"status": "ready" if ok else "unavailable", "version": __version__, "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)
