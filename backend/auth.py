"""Bearer-token verification: Better Auth JWKS (EdDSA, ES256, RS256) and/or an HS256 shared secret.

The accepted algorithms come from configuration, never from the token: the header's `alg` only
selects among them, and the key must be of that algorithm's type (no HS/RS confusion). A token
meant for the MCP server (its audience or issuer) is never a user token, whatever the secrets.

The JWKS cache is built so that a failing identity provider costs the API neither availability nor
the provider extra load: one fetch at a time however many requests need keys (they share it),
expired keys keep serving while a background refresh runs, failures back off exponentially and keep
the last good keys, and a document without usable keys never replaces them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any

import httpx
import jwt
from jwt import PyJWK

from backend.config import MCP_AUDIENCE, MCP_ISSUER, Settings

log = logging.getLogger(__name__)

MAX_USER_ID_LENGTH = 255
# A JWKS holds a handful of public keys; anything this large is not one.
MAX_JWKS_BYTES = 256 * 1024
# Public-key types only: a symmetric ("oct") key in a published set is a misconfiguration.
_KEY_TYPES = frozenset({"OKP", "EC", "RSA"})
_NUMERIC_DATES = ("exp", "nbf", "iat")


class AuthError(Exception):
    """The token is missing or invalid (answered 401 with `WWW-Authenticate: Bearer`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthUnavailable(Exception):
    """No key can decide the token now (answered 503 with `Retry-After: retry_after`)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the identity provider's keys are unavailable")
        self.retry_after = retry_after


class UnusableJwks(ValueError):
    """A fetched document holds no usable key; the message says why without quoting it."""


class JwksCache:
    """The identity provider's public keys, shared by every request of this process.

    All state is touched only from the event loop, so no lock is needed: `_inflight` is the one
    fetch that requests await (through `shield`, so a disconnecting client cannot cancel it).
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: float,
        min_refetch_seconds: float,
        timeout_seconds: float = 5.0,
        retry_seconds: float = 2.0,
        retry_max_seconds: float = 30.0,
    ) -> None:
        self._url = url
        self._ttl = ttl_seconds
        self._min_refetch = min_refetch_seconds
        self._timeout = timeout_seconds
        self._retry = retry_seconds
        self._retry_max = retry_max_seconds
        self._client: httpx.AsyncClient | None = None
        self._keys: dict[str | None, PyJWK] = {}
        self._fetched_at = 0.0  # last fetch that produced keys
        self._attempted_at = -math.inf  # last fetch started, whatever its outcome
        self._failures = 0  # consecutive failed fetches
        self._retry_at = 0.0  # no new fetch before this while failing
        self._inflight: asyncio.Task[None] | None = None

    async def key_for(self, kid: str | None) -> PyJWK | None:
        """The key for `kid`, None if the provider does not publish it, or AuthUnavailable."""
        started = time.monotonic()
        waited = False  # a request waits for one fetch at most
        if not self._keys:
            waited = await self._await_fetch(self._current_or_new_fetch(started))
            if not self._keys:
                raise AuthUnavailable(self._retry_after(self._retry_at))
        elif started - self._fetched_at > self._ttl:
            self._current_or_new_fetch(started)  # stale-while-revalidate: serve these meanwhile
        key = self._lookup(kid)
        if key is None and not waited:
            # An unknown kid usually means the issuer rotated its keys: refetch, unless a refetch
            # happened recently (made-up kids must not cost the provider a fetch each).
            fetch = self._inflight
            if fetch is None and started - self._attempted_at >= self._min_refetch:
                fetch = self._current_or_new_fetch(started)
            if fetch is not None:
                await self._await_fetch(fetch)
                key = self._lookup(kid)
        if key is None and self._failures:
            # The provider may publish this kid; while it fails we cannot tell, so no 401.
            raise AuthUnavailable(self._retry_after(max(self._retry_at, self._attempted_at + self._min_refetch)))
        return key

    async def aclose(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        if self._client is not None:
            await self._client.aclose()

    def _lookup(self, kid: str | None) -> PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        # A token without kid is accepted only when the set has exactly one key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    def _current_or_new_fetch(self, now: float) -> asyncio.Task[None] | None:
        """The running fetch, a new one, or None while backing off after failures."""
        if (self._inflight is None or self._inflight.done()) and now >= self._retry_at:
            self._attempted_at = now
            self._inflight = asyncio.create_task(self._fetch(), name="jwks-fetch")
        return self._inflight

    async def _await_fetch(self, fetch: asyncio.Task[None] | None) -> bool:
        """Wait for `fetch` if there is one (a cancelled waiter leaves it running); did we wait?"""
        if fetch is None:
            return False
        await asyncio.shield(fetch)
        return True

    @staticmethod
    def _retry_after(ready_at: float) -> int:
        """Whole seconds until `ready_at` (monotonic), at least 1: a `Retry-After` value."""
        return max(1, math.ceil(ready_at - time.monotonic()))

    async def _fetch(self) -> None:
        """One attempt; never raises, so no waiter sees anything but the keys it leaves behind."""
        try:
            async with asyncio.timeout(self._timeout):
                keys, skipped = _parse_jwks(_json(await self._download()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any provider failure must keep the last good keys
            self._failed(exc)
        else:
            if skipped:
                log.warning("JWKS from %s: ignored %d unusable key(s)", self._url, skipped)
            elif self._failures:
                log.info("JWKS from %s fetched again after %d failed attempt(s)", self._url, self._failures)
            self._keys, self._fetched_at = keys, time.monotonic()
            self._failures, self._retry_at = 0, 0.0
        finally:
            self._inflight = None

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        delay = min(self._retry * 2 ** (self._failures - 1), self._retry_max)
        self._retry_at = time.monotonic() + delay
        # The type or our own message only: a provider's body is not ours to log.
        if isinstance(exc, UnusableJwks):
            reason = str(exc)
        elif isinstance(exc, httpx.HTTPStatusError):
            reason = f"HTTP {exc.response.status_code}"
        else:
            reason = type(exc).__name__
        kept = f"keeping {len(self._keys)} cached key(s)" if self._keys else "no cached keys"
        log.warning("JWKS fetch from %s failed (%s); %s; next attempt in %.1f s", self._url, reason, kept, delay)

    async def _download(self) -> bytes:
        if self._client is None:
            # One client (and its keep-alive connection) for every fetch; the timeout is ours.
            self._client = httpx.AsyncClient(timeout=self._timeout)
        async with self._client.stream("GET", self._url, headers={"Accept": "application/json"}) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise UnusableJwks(f"document larger than {MAX_JWKS_BYTES} bytes")
        return bytes(body)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise UnusableJwks("not JSON") from exc


def _parse_jwks(document: Any) -> tuple[dict[str | None, PyJWK], int]:
    """The usable signing keys by kid and how many entries were skipped; UnusableJwks if none."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise UnusableJwks('not a JSON object with a "keys" array')
    keys: dict[str | None, PyJWK] = {}
    skipped = 0
    for entry in entries:
        if isinstance(entry, dict) and entry.get("use", "sig") != "sig":
            continue  # an encryption key is not a mistake, just not ours
        try:
            if not isinstance(entry, dict) or entry.get("kty") not in _KEY_TYPES:
                raise UnusableJwks("unsupported key type")
            kid = entry.get("kid")
            keys[kid if isinstance(kid, str) else None] = PyJWK(entry)
        except Exception:  # malformed key material raises many types; skip the key
            skipped += 1
    if not keys:
        raise UnusableJwks(f"no usable signing key ({skipped} unusable)")
    return keys, skipped


def _check_claim_types(claims: dict[str, Any]) -> None:
    """Reject what PyJWT would coerce or not look at: string dates, non-string audiences/issuers."""
    for name in _NUMERIC_DATES:
        value = claims.get(name)
        if name in claims and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
        ):
            raise AuthError(f"{name} is not a NumericDate")
    aud = claims.get("aud")
    if "aud" in claims and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise AuthError("aud is not a string or a list of strings")
    if "iss" in claims and not isinstance(claims["iss"], str):
        raise AuthError("iss is not a string")


def _reject_delegation_tokens(claims: dict[str, Any]) -> None:
    """A token addressed to (or minted for) the MCP server never authenticates a user here."""
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if MCP_AUDIENCE in audiences or claims.get("iss") == MCP_ISSUER:
        raise AuthError("token is meant for the MCP server")


class TokenVerifier:
    """Turns an `Authorization: Bearer` token into the user id (`sub`), or raises AuthError."""

    def __init__(self, settings: Settings) -> None:
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
                timeout_seconds=settings.auth_jwks_timeout_seconds,
                retry_seconds=settings.auth_jwks_retry_seconds,
                retry_max_seconds=settings.auth_jwks_retry_max_seconds,
            )
            if settings.auth_jwks_url
            else None
        )

    async def aclose(self) -> None:
        if self._jwks is not None:
            await self._jwks.aclose()

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
        _check_claim_types(claims)
        _reject_delegation_tokens(claims)
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
