"""Delegation tokens: the API's per-turn grant that lets the MCP server act for one user.

The user's own JWT never leaves the API. For each turn the API mints a short-lived HS256 token
whose audience is the MCP server and whose `sub` is the verified user id; the MCP server verifies it
(`backend/mcp_server/auth.py`) and takes the user from it, so no tool argument can name a user.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import jwt

from backend.config import MCP_AUDIENCE, MCP_ISSUER

ALGORITHM = "HS256"
SCOPE = "tasks"
# MCP request `_meta` key: which occurrence of an identical tool call within one run this is.
CALL_META = "chat-backend/call"


@dataclass(frozen=True, slots=True)
class Delegation:
    user_id: str
    expires_at: int
    token_id: str
    # The user message the turn answers: the same for every re-run of that turn (see tool_call).
    turn: str | None = None


def mint_delegation_token(secret: str, user_id: str, *, ttl_seconds: int = 600, turn: str | None = None) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": MCP_ISSUER,
        "aud": MCP_AUDIENCE,
        "sub": user_id,
        "scope": SCOPE,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    if turn is not None:
        claims["turn"] = turn
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_delegation_token(secret: str, token: str) -> Delegation | None:
    """The verified delegation, or None for any invalid, expired or foreign token."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=MCP_AUDIENCE,
            issuer=MCP_ISSUER,
            options={"require": ["exp", "sub", "aud", "iss"]},
            leeway=5,
        )
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or claims.get("scope") != SCOPE:
        return None
    turn = claims.get("turn")
    return Delegation(
        user_id=sub,
        expires_at=int(claims["exp"]),
        token_id=str(claims.get("jti", "")),
        turn=turn if isinstance(turn, str) else None,
    )


def mint_turn_token(
    secret: str,
    user_id: str,
    *,
    conversation_id: uuid.UUID,
    turn_id: uuid.UUID,
    replay_scope: str,
    ttl_seconds: int,
) -> str:
    """A token for one turn: the user, the conversation and the lease it runs under."""
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": MCP_ISSUER,
        "aud": MCP_AUDIENCE,
        "sub": user_id,
        "scope": SCOPE,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
        "cid": str(conversation_id),
        "tid": str(turn_id),
        "turn": replay_scope,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
