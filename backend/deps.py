"""Typed FastAPI dependencies: settings, the database, the turn service, the current user, an owned
conversation. All async: trivial dependencies must not queue in the threadpool behind database work."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from backend.auth import AuthError, AuthUnavailable, TokenVerifier
from backend.config import Settings
from backend.db import Database
from backend.failures import Unauthorized, Unavailable
from backend.services import conversations
from backend.services.conversations import OwnedRow
from backend.services.turn import TurnService


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def get_turns(request: Request) -> TurnService:
    turns: TurnService = request.app.state.turns
    return turns


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_db)]
TurnsDep = Annotated[TurnService, Depends(get_turns)]

_bearer = HTTPBearer(
    auto_error=False, bearerFormat="JWT", description="A JWT from the identity provider; its `sub` is the user"
)


async def get_current_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The verified token's `sub`: the only source of identity."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Missing bearer token")
    verifier: TokenVerifier = request.app.state.verifier
    try:
        return await verifier.verify(credentials.credentials)
    except AuthError as exc:
        raise Unauthorized("Invalid or missing bearer token") from exc
    except AuthUnavailable as exc:
        message = "The identity provider's keys are unavailable; try again later"
        raise Unavailable(message, code="auth_unavailable", retry_after=exc.retry_after) from exc


CurrentUser = Annotated[str, Depends(get_current_user)]


async def get_owned_conversation(
    conversation_id: Annotated[uuid.UUID, Path()], user_id: CurrentUser, db: DatabaseDep
) -> OwnedRow:
    """The conversation if this user owns it (queried by id AND user); else 404, like a missing one."""
    return await db.run(lambda c: conversations.owned(c, conversation_id, user_id))


OwnedConversation = Annotated[OwnedRow, Depends(get_owned_conversation)]
