"""Tokens for tests: HS256 with the test secret, or signed by generated asymmetric keys."""

from __future__ import annotations

import time
from typing import Any

import jwt

TEST_AUTH_SECRET = "test-auth-secret-0123456789abcdef0123456789"


def user_token(sub: str | None = "alice", *, secret: str = TEST_AUTH_SECRET, ttl: int = 300, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"iat": now, "exp": now + ttl, **claims}
    if sub is not None:
        payload["sub"] = sub
    return jwt.encode(payload, secret, algorithm="HS256")


def auth(sub: str = "alice") -> dict[str, str]:
    # Module-level headers live as long as the whole suite: give them hours, not minutes.
    return {"Authorization": f"Bearer {user_token(sub, ttl=6 * 3600)}"}
