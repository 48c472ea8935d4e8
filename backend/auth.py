"""Bearer-token verification: Better Auth JWKS (EdDSA, ES256, RS256) and/or an HS256 shared secret.

The accepted algorithms come from configuration, never from the token: the header's `alg` only
selects among them, and the key must be of that algorithm's type (no HS/RS confusion). JWKS keys
are cached, refetched when stale or when an unknown `kid` shows up (rate-limited, so a flood of
made-up kids cannot hammer the issuer), and always fetched with an async client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import jwt
from jwt import PyJWK

from backend.config import Settings

log = logging.getLogger(__name__)

MAX_USER_ID_LENGTH = 255


class AuthError(Exception):
    """The token is missing or invalid (answered 401 with `WWW-Authenticate: Bearer`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthUnavailable(Exception):
    """The JWKS could not be fetched and no cached key can decide (answered 503)."""


class JwksCache:
    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: float,
        min_refetch_seconds: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = url
        self._ttl = ttl_seconds
        self._min_refetch = min_refetch_seconds
        self._transport = transport
        self._keys: dict[str | None, PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None) -> PyJWK | None:
        now = time.monotonic()
        if self._fetched_at is None or now - self._fetched_at > self._ttl:
            await self._refresh(force=True)
        key = self._lookup(kid)
        if key is None and self._fetched_at is not None and time.monotonic() - self._fetched_at >= self._min_refetch:
            # An unknown kid usually means the issuer rotated its keys.
            await self._refresh(force=False)
            key = self._lookup(kid)
        return key

    def _lookup(self, kid: str | None) -> PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        # A token without kid is accepted only when the set has exactly one key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    async def _refresh(self, *, force: bool) -> None:
        started = time.monotonic()
        async with self._lock:
            # Another request refreshed while this one waited for the lock.
            if self._fetched_at is not None and self._fetched_at >= started and not force:
                return
            try:
                async with httpx.AsyncClient(transport=self._transport, timeout=5.0) as client:
                    response = await client.get(self._url)
                    response.raise_for_status()
                    document = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("JWKS fetch from %s failed: %s", self._url, type(exc).__name__)
                if not self._keys:
                    raise AuthUnavailable("the identity provider's keys are unavailable") from exc
                self._fetched_at = time.monotonic()  # keep serving the cached keys; retry later
                return
            self._keys = _parse_jwks(document)
            self._fetched_at = time.monotonic()


def _parse_jwks(document: Any) -> dict[str | None, PyJWK]:
    keys: dict[str | None, PyJWK] = {}
    for entry in document.get("keys", []) if isinstance(document, dict) else []:
        if entry.get("use", "sig") != "sig":
            continue
        try:
            keys[entry.get("kid")] = PyJWK(entry)
        except jwt.PyJWTError:
            log.warning("skipping unusable JWKS key kid=%s", entry.get("kid"))
    return keys


class TokenVerifier:
    """Turns an `Authorization: Bearer` token into the user id (`sub`), or raises AuthError."""

    def __init__(self, settings: Settings, *, jwks_transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._secret = settings.resolved_auth_secret()
        self._algorithms = set(settings.algorithms)
        self._issuer = settings.auth_issuer
        self._audience = settings.auth_audience
        self._leeway = settings.auth_leeway_seconds
        self._jwks = (
            JwksCache(
                settings.auth_jwks_url,
                ttl_seconds=settings.auth_jwks_cache_seconds,
                min_refetch_seconds=settings.auth_jwks_refetch_seconds,
                transport=jwks_transport,
            )
            if settings.auth_jwks_url
            else None
        )

    async def verify(self, token: str) -> str:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("malformed token") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("algorithm not allowed")
        key = await self._key(alg, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(type(exc).__name__) from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip() or len(sub) > MAX_USER_ID_LENGTH or "\x00" in sub:
            raise AuthError("invalid sub")
        return sub

    async def _key(self, alg: str, kid: Any) -> Any:
        if alg.startswith("HS"):
            if not self._secret:
                raise AuthError("no shared secret configured")
            return self._secret
        if self._jwks is None:
            raise AuthError("no JWKS configured")
        jwk = await self._jwks.key_for(kid if isinstance(kid, str) else None)
        if jwk is None:
            raise AuthError("unknown signing key")
        if jwk.algorithm_name != alg:
            raise AuthError("key does not match the algorithm")
        return jwk.key
