"""A Better Auth-like JWKS endpoint over real HTTP that a test controls.

The API's JWKS cache is judged by how it treats a misbehaving identity provider, so the provider is
a real loopback server (uvicorn in a thread) whose faults a test switches on and off: down
(`stop()`: connection refused, or `status = 503`), slow (`delay`), held until released (`hold()`),
malformed (`serve_body`), rotated keys (`SigningKeys.rotate`). It counts what it saw: `fetches`
(requests received), `answered` (responses finished) and `peers` (client connections).
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.support.servers import free_port, serve_in_thread

JWKS_PATH = "/api/auth/jwks"
HEALTH_PATH = "/__jwks/health"


def _public_jwk(jwk_json: str, kid: str, **extra: str) -> dict[str, Any]:
    return {**json.loads(jwk_json), "kid": kid, **extra}


class SigningKeys:
    """Private keys of each kind Better Auth can publish (Ed25519, RSA, P-256) and their public JWKS."""

    def __init__(self) -> None:
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.published: list[dict[str, Any]] = [
            _public_jwk(OKPAlgorithm.to_jwk(self.ed.public_key()), "ed-1", alg="EdDSA"),
            _public_jwk(RSAAlgorithm.to_jwk(self.rsa.public_key()), "rsa-1"),
            _public_jwk(ECAlgorithm.to_jwk(self.ec.public_key()), "ec-1"),
        ]

    def rotate(self, kid: str) -> ed25519.Ed25519PrivateKey:
        """Publish a new Ed25519 key next to the old ones (what Better Auth does on rotation)."""
        key = ed25519.Ed25519PrivateKey.generate()
        self.publish(key, kid)
        return key

    def publish(self, key: ed25519.Ed25519PrivateKey, kid: str) -> None:
        self.published.append(_public_jwk(OKPAlgorithm.to_jwk(key.public_key()), kid, alg="EdDSA"))

    def sign(self, claims: dict[str, Any], *, kid: str = "ed-1", key: Any = None, alg: str = "EdDSA") -> str:
        return jwt.encode(claims, key if key is not None else self.ed, algorithm=alg, headers={"kid": kid})


class JwksServer(AbstractContextManager["JwksServer"]):
    """Serves `keys.published` at `url` until told to misbehave. `start()`/`stop()` keep the port."""

    def __init__(self, keys: SigningKeys | None = None, *, port: int | None = None) -> None:
        self.keys = keys or SigningKeys()
        self.port = port or free_port()
        self.status = 200
        self.delay = 0.0
        self.body: bytes | None = None  # served instead of the keys when set
        self.fetches = 0
        self.answered = 0
        self.peers: set[tuple[str, int]] = set()
        self._open = threading.Event()
        self._open.set()
        self._server: AbstractContextManager[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{JWKS_PATH}"

    # --- switches -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._server is None:
            server = serve_in_thread(self._app(), port=self.port, health_path=HEALTH_PATH)
            server.__enter__()
            self._server = server

    def stop(self) -> None:
        """Down: connections are refused until `start()`."""
        self.release()
        if self._server is not None:
            server, self._server = self._server, None
            server.__exit__(None, None, None)

    def hold(self) -> None:
        """Requests are received (and counted) but not answered until `release()`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def serve_body(self, body: bytes | Any) -> None:
        """Answer 200 with this body (bytes as they are, anything else as JSON) instead of the keys."""
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()

    def heal(self) -> None:
        self.status, self.delay, self.body = 200, 0.0, None
        self.release()

    async def wait_fetches(self, count: int, timeout: float = 10.0) -> None:
        """Wait (from the test's loop) until `count` requests have arrived."""
        async with asyncio.timeout(timeout):
            while self.fetches < count:
                await asyncio.sleep(0.01)

    async def wait_answered(self, count: int, timeout: float = 10.0) -> None:
        """Wait (from the test's loop) until `count` responses have been sent."""
        async with asyncio.timeout(timeout):
            while self.answered < count:
                await asyncio.sleep(0.01)

    # --- the app --------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        async def jwks(request: Request) -> Response:
            self.fetches += 1
            if request.client is not None:
                self.peers.add((request.client.host, request.client.port))
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
                while not self._open.is_set():
                    await asyncio.sleep(0.01)
                if self.status != 200:
                    return JSONResponse({"error": "unavailable"}, status_code=self.status)
                if self.body is not None:
                    return Response(self.body, media_type="application/json")
                return JSONResponse({"keys": self.keys.published})
            finally:
                self.answered += 1

        async def health(_: Request) -> Response:
            return PlainTextResponse("ok")

        return Starlette(routes=[Route(JWKS_PATH, jwks), Route(HEALTH_PATH, health)])

    def __enter__(self) -> JwksServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
