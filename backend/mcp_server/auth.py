"""Bearer-token verification for the MCP server: only delegation tokens are accepted.

The verified `Delegation` rides on the access token the SDK keeps for the request, so a tool reads
who it acts for (and for which turn) from there and nowhere else.
"""

from __future__ import annotations

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import ConfigDict

from backend.config import MCP_ISSUER
from backend.delegation import SCOPE, Delegation, verify_delegation_token


class DelegatedAccessToken(AccessToken):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    delegation: Delegation


class DelegationTokenVerifier:
    """`mcp.server.auth.provider.TokenVerifier`: a valid delegation token -> an AccessToken for its user."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def verify_token(self, token: str) -> AccessToken | None:
        # HS256 verification is a few microseconds of CPU: no need for a worker thread.
        delegation = verify_delegation_token(self._secret, token)
        if delegation is None:
            return None
        return DelegatedAccessToken(
            token=token,
            client_id=MCP_ISSUER,
            scopes=[SCOPE],
            expires_at=delegation.expires_at,
            subject=delegation.user_id,
            claims={"iss": MCP_ISSUER, "jti": delegation.token_id, "use": delegation.use},
            delegation=delegation,
        )


def current_delegation() -> Delegation:
    """The verified delegation of this request: the only source of identity a tool may use."""
    token = get_access_token()
    if not isinstance(token, DelegatedAccessToken):
        # Unreachable behind RequireAuthMiddleware; refuse rather than guess if the wiring changes.
        raise ToolError("not authenticated")
    return token.delegation
