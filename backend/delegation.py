"""Delegation tokens: the grants that let the MCP server act for one user.

The user's own JWT never leaves the API. The MCP server accepts two kinds of HS256 token, both with
the MCP server as audience and the user in `sub`, both verified here and nowhere else:

- a **turn token**, minted by the API for one chat turn. It names the conversation (`cid`) and the
  turn's lease (`tid`, the conversation's `turn_id` while the turn runs), and the MCP server honours
  it only while that lease holds, so a token captured on the API->MCP hop is worth one turn;
- an **operator token**, minted by `chat-backend token --mcp` for MCP Inspector and other hand-driven
  clients. It names no turn, says so (`use: operator`), and lives at most an hour.

A token that is neither is refused. Claim types are checked strictly: a numeric claim given as a
string is not a number.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import jwt

from backend.config import MCP_AUDIENCE, MCP_ISSUER

ALGORITHM = "HS256"
SCOPE = "tasks"
LEEWAY_SECONDS = 5
# MCP request `_meta` key: which occurrence of an identical tool call within one run this is.
CALL_META = "chat-backend/call"

Use = Literal["turn", "operator"]
TURN_USE: Literal["turn"] = "turn"
OPERATOR_USE: Literal["operator"] = "operator"
OPERATOR_TTL_SECONDS = 300
OPERATOR_MAX_TTL_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class Delegation:
    user_id: str
    expires_at: int
    token_id: str
    use: Use
    # Turn tokens only: the conversation and the lease (conversation.turn_id) the token is bound to.
    conversation_id: uuid.UUID | None = None
    turn_id: uuid.UUID | None = None
    # Turn tokens only (claim `turn`): the same for every re-run of a turn, it scopes the tool_call
    # replay key. Opaque here; the API decides its value.
    replay_scope: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.use == OPERATOR_USE


def _claims(user_id: str, use: Use, ttl_seconds: int) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": MCP_ISSUER,
        "aud": MCP_AUDIENCE,
        "sub": user_id,
        "scope": SCOPE,
        "use": use,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }


def mint_turn_token(
    secret: str,
    user_id: str,
    *,
    conversation_id: uuid.UUID,
    turn_id: uuid.UUID,
    replay_scope: str,
    ttl_seconds: int,
) -> str:
    """The API's grant for one turn: accepted only while `turn_id` holds `conversation_id`'s lease."""
    claims = _claims(user_id, TURN_USE, ttl_seconds)
    claims.update(cid=str(conversation_id), tid=str(turn_id), turn=replay_scope)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def mint_operator_token(secret: str, user_id: str, *, ttl_seconds: int = OPERATOR_TTL_SECONDS) -> str:
    """A hand-use token (MCP Inspector): bound to no turn, so it is short-lived instead."""
    if ttl_seconds > OPERATOR_MAX_TTL_SECONDS:
        raise ValueError(f"an operator token lives at most {OPERATOR_MAX_TTL_SECONDS} seconds")
    return jwt.encode(_claims(user_id, OPERATOR_USE, ttl_seconds), secret, algorithm=ALGORITHM)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _uuid(value: object) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def verify_delegation_token(secret: str, token: str) -> Delegation | None:
    """The verified delegation, or None for any invalid, expired, foreign or unnamed token."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=MCP_AUDIENCE,
            issuer=MCP_ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.PyJWTError:
        return None
    sub, use = claims.get("sub"), claims.get("use")
    if not isinstance(sub, str) or not sub or claims.get("scope") != SCOPE:
        return None
    # PyJWT accepts "1795000000" for exp/iat/nbf (it calls int()); a NumericDate is a number.
    if not all(_number(claims[name]) for name in ("exp", "iat", "nbf") if name in claims):
        return None
    expires_at, token_id = int(claims["exp"]), str(claims.get("jti", ""))
    if use == OPERATOR_USE:
        if "cid" in claims or "tid" in claims or "turn" in claims:
            return None
        if claims["exp"] - claims["iat"] > OPERATOR_MAX_TTL_SECONDS:
            return None
        return Delegation(user_id=sub, expires_at=expires_at, token_id=token_id, use=OPERATOR_USE)
    if use == TURN_USE:
        conversation_id, turn_id, scope = _uuid(claims.get("cid")), _uuid(claims.get("tid")), claims.get("turn")
        if conversation_id is None or turn_id is None or not isinstance(scope, str) or not scope:
            return None
        return Delegation(
            user_id=sub,
            expires_at=expires_at,
            token_id=token_id,
            use=TURN_USE,
            conversation_id=conversation_id,
            turn_id=turn_id,
            replay_scope=scope,
        )
    return None
