"""Bearer-token verification: every failure is 401 + WWW-Authenticate: Bearer; JWKS rotation works."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from backend.config import Settings
from backend.main import create_app
from tests.conftest import make_settings
from tests.support.tokens import TEST_AUTH_SECRET, user_token

ISSUER = "http://localhost:3000"
JWKS_URL = "http://auth.test/api/auth/jwks"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class Keys:
    """A key of each kind Better Auth can publish, plus a JWKS server (an httpx transport)."""

    def __init__(self) -> None:
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.published: list[dict[str, Any]] = [
            {**json.loads(OKPAlgorithm.to_jwk(self.ed.public_key())), "kid": "ed-1", "alg": "EdDSA"},
            {**json.loads(RSAAlgorithm.to_jwk(self.rsa.public_key())), "kid": "rsa-1"},
            {**json.loads(ECAlgorithm.to_jwk(self.ec.public_key())), "kid": "ec-1"},
        ]
        self.fetches = 0

    def transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            assert str(request.url) == JWKS_URL
            self.fetches += 1
            return httpx.Response(200, json={"keys": self.published})

        return httpx.MockTransport(handler)


def claims(sub: str | None = "alice", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iat": now, "exp": now + 300, "iss": ISSUER, "aud": ISSUER, **extra}
    if sub is not None:
        base["sub"] = sub
    return base


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
async def jwks_client(database_url: str, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        database_url,
        auth_secret=None,
        auth_jwks_url=JWKS_URL,
        auth_issuer=ISSUER,
        auth_audience=ISSUER,
        auth_jwks_refetch_seconds=0,
    )
    async for http in _client(settings, keys.transport()):
        yield http


async def _client(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, jwks_transport=transport)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
        yield http


async def _status(http: httpx.AsyncClient, token: str | None, scheme: str = "Bearer") -> httpx.Response:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return await http.get("/api/conversations", headers=headers)


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["code"] == "unauthorized"


# --- HS256 shared secret ---------------------------------------------------------------------------


async def test_valid_hs256_token(client: httpx.AsyncClient) -> None:
    response = await _status(client, user_token("alice"))
    assert response.status_code == 200
    assert response.json() == {"data": [], "next_cursor": None}


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(None, id="no-header"),
        pytest.param("not-a-jwt", id="malformed"),
        pytest.param("a.b.c", id="garbage-segments"),
        pytest.param(user_token("alice", secret="another-secret-0123456789abcdef012345"), id="wrong-key"),
        pytest.param(user_token("alice", ttl=-60), id="expired"),
        pytest.param(user_token("alice", nbf=int(time.time()) + 600), id="nbf-in-future"),
        pytest.param(user_token(None), id="missing-sub"),
        pytest.param(user_token(""), id="empty-sub"),
        pytest.param(jwt.encode({"sub": "alice"}, TEST_AUTH_SECRET, algorithm="HS256"), id="missing-exp"),
        pytest.param(jwt.encode(claims(), TEST_AUTH_SECRET, algorithm="HS512"), id="alg-not-in-allowlist"),
    ],
)
async def test_rejected_hs256_tokens(client: httpx.AsyncClient, token: str | None) -> None:
    _assert_401(await _status(client, token))


async def test_basic_scheme_is_rejected(client: httpx.AsyncClient) -> None:
    _assert_401(await _status(client, "YWxpY2U6cHc=", scheme="Basic"))


def _alg_none_token(payload: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}."


async def test_alg_none_is_rejected(client: httpx.AsyncClient) -> None:
    _assert_401(await _status(client, _alg_none_token(claims())))


async def test_issuer_and_audience_checked_when_configured(database_url: str) -> None:
    settings = make_settings(database_url, auth_issuer=ISSUER, auth_audience="chat-api")
    async for http in _client(settings):
        ok = user_token("alice", iss=ISSUER, aud="chat-api")
        assert (await _status(http, ok)).status_code == 200
        _assert_401(await _status(http, user_token("alice", iss="http://evil.test", aud="chat-api")))
        _assert_401(await _status(http, user_token("alice", iss=ISSUER, aud="other-api")))
        _assert_401(await _status(http, user_token("alice", aud="chat-api")))  # iss missing


async def test_token_with_aud_accepted_when_audience_not_configured(client: httpx.AsyncClient) -> None:
    # Better Auth always sets aud; without AUTH_AUDIENCE the API must not reject that.
    assert (await _status(client, user_token("alice", aud=ISSUER))).status_code == 200


# --- JWKS (Better Auth) ---------------------------------------------------------------------------


def _sign(key: Any, alg: str, kid: str, payload: dict[str, Any] | None = None) -> str:
    return jwt.encode(payload or claims(), key, algorithm=alg, headers={"kid": kid})


async def test_jwks_eddsa_rs256_es256(jwks_client: httpx.AsyncClient, keys: Keys) -> None:
    for key, alg, kid in [(keys.ed, "EdDSA", "ed-1"), (keys.rsa, "RS256", "rsa-1"), (keys.ec, "ES256", "ec-1")]:
        response = await _status(jwks_client, _sign(key, alg, kid))
        assert response.status_code == 200, (alg, response.text)
    assert keys.fetches == 1  # cached


async def test_better_auth_shaped_token(jwks_client: httpx.AsyncClient, keys: Keys) -> None:
    # Header {"alg": "EdDSA", "kid": ...} without typ, the user row in the claims, no nbf/jti.
    payload = claims("Xk2mP9qLr", name="Alice", email="a@example.com", emailVerified=True, id="Xk2mP9qLr")
    token = jwt.encode(payload, keys.ed, algorithm="EdDSA", headers={"kid": "ed-1", "typ": None})
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "==")) == {"alg": "EdDSA", "kid": "ed-1"}
    response = await _status(jwks_client, token)
    assert response.status_code == 200


async def test_jwks_rejections(jwks_client: httpx.AsyncClient, keys: Keys) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    _assert_401(await _status(jwks_client, _sign(other, "EdDSA", "ed-1")))  # wrong key, known kid
    _assert_401(await _status(jwks_client, _sign(keys.ed, "EdDSA", "ed-1", claims(exp=int(time.time()) - 60))))
    _assert_401(await _status(jwks_client, _sign(keys.ed, "EdDSA", "ed-1", claims(iss="http://evil.test"))))
    _assert_401(await _status(jwks_client, _sign(keys.ed, "EdDSA", "ed-1", claims(aud="http://evil.test"))))
    _assert_401(await _status(jwks_client, _sign(keys.ed, "EdDSA", "ed-1", claims(sub=None))))
    # A key used with another algorithm than its own: RSA key id, EC signature.
    _assert_401(await _status(jwks_client, _sign(keys.ec, "ES256", "rsa-1")))
    # HS256 is not allowed when only a JWKS is configured.
    _assert_401(await _status(jwks_client, jwt.encode(claims(), "x" * 40, algorithm="HS256")))
    _assert_401(await _status(jwks_client, _alg_none_token(claims())))


async def test_hs_rs_confusion(database_url: str, keys: Keys) -> None:
    """HS256 signed with the RSA public key as the secret must fail even when HS256 is allowed."""
    settings = make_settings(
        database_url, auth_jwks_url=JWKS_URL, auth_issuer=ISSUER, auth_audience=ISSUER, auth_jwks_refetch_seconds=0
    )
    public_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims()).encode())
    import hashlib
    import hmac

    signature = _b64(hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
    forged = f"{header}.{body}.{signature}"
    async for http in _client(settings, keys.transport()):
        _assert_401(await _status(http, forged))
        assert (await _status(http, _sign(keys.rsa, "RS256", "rsa-1"))).status_code == 200


async def test_unknown_kid_then_rotated_jwks(jwks_client: httpx.AsyncClient, keys: Keys) -> None:
    assert (await _status(jwks_client, _sign(keys.ed, "EdDSA", "ed-1"))).status_code == 200
    rotated = ed25519.Ed25519PrivateKey.generate()
    token = _sign(rotated, "EdDSA", "ed-2")
    _assert_401(await _status(jwks_client, token))  # not published yet: refetched, still unknown
    assert keys.fetches == 2
    keys.published.append({**json.loads(OKPAlgorithm.to_jwk(rotated.public_key())), "kid": "ed-2", "alg": "EdDSA"})
    assert (await _status(jwks_client, token)).status_code == 200  # refetched on the unknown kid
    assert keys.fetches == 3


async def test_unknown_kid_refetch_is_rate_limited(database_url: str, keys: Keys) -> None:
    settings = make_settings(database_url, auth_secret=None, auth_jwks_url=JWKS_URL, auth_jwks_refetch_seconds=60)
    async for http in _client(settings, keys.transport()):
        for i in range(5):
            _assert_401(await _status(http, _sign(keys.ed, "EdDSA", f"made-up-{i}")))
        assert keys.fetches == 1


async def test_jwks_unreachable_is_503_not_500(database_url: str, keys: Keys) -> None:
    def down(_: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    settings = make_settings(database_url, auth_secret=None, auth_jwks_url=JWKS_URL)
    async for http in _client(settings, httpx.MockTransport(down)):
        response = await _status(http, _sign(keys.ed, "EdDSA", "ed-1"))
        assert response.status_code == 503
        assert response.json()["code"] == "auth_unavailable"
