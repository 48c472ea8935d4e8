"""Liveness (`/health`) and readiness (`/health/ready`: the database and the MCP server answer).

Readiness answers within a few seconds whatever the dependencies do: a stalled database or MCP
server is reported as down, not waited for.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from backend import __version__
from backend.deps import DatabaseDep, SettingsDep

# Probes carry no token (`security: []`): a load balancer or an orchestrator calls them.
router = APIRouter(tags=["health"])
PUBLIC: dict[str, Any] = {"security": []}


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class ReadyChecks(BaseModel):
    database: bool
    mcp: bool


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    version: str
    checks: ReadyChecks


CHECK_SECONDS = 2.5


@router.get("/health", openapi_extra=PUBLIC)
async def health() -> Health:
    return Health(status="ok", version=__version__)


async def _mcp_ready(request: Request, url: str) -> bool:
    client: httpx.AsyncClient = request.app.state.http
    try:
        response = await client.get(url, timeout=CHECK_SECONDS)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


@router.get(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency is unreachable"}},
    openapi_extra=PUBLIC,
)
async def ready(request: Request, db: DatabaseDep, settings: SettingsDep) -> JSONResponse:
    database, mcp = await asyncio.gather(
        db.ping(within=CHECK_SECONDS), _mcp_ready(request, settings.mcp_base_url + "/health")
    )
    checks: dict[str, Any] = {"database": database, "mcp": mcp}
    ok = all(checks.values())
    body = {"status": "ready" if ok else "unavailable", "version": __version__, "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)
