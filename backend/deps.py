"""Typed FastAPI dependencies: settings, DB session, the current user, an owned conversation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session

from backend.auth import AuthError, AuthUnavailable, TokenVerifier
from backend.config import Settings
from backend.db import session_scope
from backend.errors import ApiError, not_found, unauthorized
from backend.models import Conversation
from backend.services.conversations import get_owned
from backend.services.turn import TurnDeps


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_turn_deps(request: Request) -> TurnDeps:
    deps: TurnDeps = request.app.state.turn_deps
    return deps


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
TurnDepsDep = Annotated[TurnDeps, Depends(get_turn_deps)]


def get_session(engine: EngineDep) -> Iterator[Session]:
    with session_scope(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False)


async def get_current_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The verified token's `sub`: the only source of identity."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise unauthorized("Missing bearer token")
    verifier: TokenVerifier = request.app.state.verifier
    try:
        return await verifier.verify(credentials.credentials)
    except AuthError as exc:
        raise unauthorized() from exc
    except AuthUnavailable as exc:
        raise ApiError(503, "auth_unavailable", "Token keys are unavailable; try again", retryable=True) from exc


CurrentUser = Annotated[str, Depends(get_current_user)]


def get_owned_conversation(
    conversation_id: Annotated[uuid.UUID, Path()], user_id: CurrentUser, session: SessionDep
) -> Conversation:
    """The conversation if this user owns it; someone else's answers exactly like a missing one."""
    conversation = get_owned(session, conversation_id, user_id)
    if conversation is None:
        raise not_found()
    return conversation


OwnedConversation = Annotated[Conversation, Depends(get_owned_conversation)]
