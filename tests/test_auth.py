"""Bearer-token verification: every failure is 401 + WWW-Authenticate: Bearer; JWKS rotation works;
a failing identity provider never multiplies fetches, queues requests or answers 500."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from backend.config import MCP_AUDIENCE, MCP_ISSUER, ConfigError, Settings
from backend.delegation import mint_operator_token, mint_turn_token
from backend.main import create_app
from tests.conftest import make_settings
from tests.support.jwks_server import JwksServer, SigningKeys
from tests.support.stack import api_client
from tests.support.tokens import TEST_AUTH_SECRET, user_token

ISSUER = "http://localhost:3000"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def claims(sub: str | None = "alice", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iat": now, "exp": now + 300, "iss": ISSUER, "aud": ISSUER, **extra}
    if sub is not None:
        base["sub"] = sub
    return base


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    """A running JWKS server; a test may stop, slow, hold or corrupt it."""
    with JwksServer() as server:
        yield server


@pytest.fixture
def keys(jwks: JwksServer) -> SigningKeys:
    return jwks.keys


def jwks_settings(database_url: str, server: JwksServer, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "auth_secret": None,
        "auth_jwks_url": server.url,
        "auth_issuer": ISSUER,
        "auth_audience": ISSUER,
        "auth_jwks_refetch_seconds": 0,
    }
    return make_settings(database_url, **{**values, **overrides})


@pytest.fixture
async def jwks_client(database_url: str, jwks: JwksServer) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(jwks_settings(database_url, jwks)) as http:
        yield http


async def _status(http: httpx.AsyncClient, token: str | None, scheme: str = "Bearer") -> httpx.Response:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return await http.get("/api/conversations", headers=headers)


async def _burst(http: httpx.AsyncClient, token: str, count: int) -> list[httpx.Response]:
    """`count` concurrent requests; a queue behind the provider fails the test instead of hanging it."""
    async with asyncio.timeout(30):
        return list(await asyncio.gather(*(_status(http, token) for _ in range(count))))


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["code"] == "unauthorized"


def _assert_auth_unavailable(response: httpx.Response, max_retry_after: float) -> None:
    assert response.status_code == 503, response.text
    assert set(response.json()) == {"detail", "code", "retryable", "request_id"}
    assert response.json()["code"] == "auth_unavailable"
    assert response.json()["retryable"] is True
    assert 1 <= int(response.headers["retry-after"]) <= max_retry_after


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
    async with api_client(settings) as http:
        ok = user_token("alice", iss=ISSUER, aud="chat-api")
        assert (await _status(http, ok)).status_code == 200
        _assert_401(await _status(http, user_token("alice", iss="http://evil.test", aud="chat-api")))
        _assert_401(await _status(http, user_token("alice", iss=ISSUER, aud="other-api")))
        _assert_401(await _status(http, user_token("alice", aud="chat-api")))  # iss missing
        # Listing the API's audience does not excuse also naming the MCP server's.
        _assert_401(await _status(http, user_token("alice", iss=ISSUER, aud=["chat-api", MCP_AUDIENCE])))


async def test_token_with_aud_accepted_when_audience_not_configured(client: httpx.AsyncClient) -> None:
    # Better Auth always sets aud; without AUTH_AUDIENCE the API must not reject that.
    assert (await _status(client, user_token("alice", aud=ISSUER))).status_code == 200
    assert (await _status(client, user_token("alice", aud=[ISSUER, "another-app"]))).status_code == 200


# --- Secrets and audiences stay apart ----------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(mint_operator_token(TEST_AUTH_SECRET, "alice"), id="operator-token"),
        pytest.param(
            mint_turn_token(
                TEST_AUTH_SECRET,
                "alice",
                conversation_id=uuid.uuid4(),
                turn_id=uuid.uuid4(),
                replay_scope="r",
                ttl_seconds=60,
            ),
            id="turn-token",
        ),
        pytest.param(user_token("alice", aud=MCP_AUDIENCE), id="mcp-audience"),
        pytest.param(user_token("alice", aud=[ISSUER, MCP_AUDIENCE]), id="mcp-audience-in-a-list"),
        pytest.param(user_token("alice", iss=MCP_ISSUER), id="mcp-issuer"),
    ],
)
async def test_delegation_tokens_are_never_user_tokens(client: httpx.AsyncClient, token: str) -> None:
    """Even signed with AUTH_SECRET and with AUTH_AUDIENCE unset, an MCP-bound token is refused."""
    _assert_401(await _status(client, token))


def test_shared_auth_and_mcp_secret_refuses_to_start() -> None:
    secret = "one-secret-for-both-0123456789abcdef0123"
    settings = make_settings("postgresql://u@h/db", auth_secret=secret, mcp_token_secret=secret)
    for validate in (settings.validate_for_api, settings.validate_for_mcp):
        with pytest.raises(ConfigError, match=r"AUTH_SECRET.*MCP_TOKEN_SECRET"):
            validate()
    with pytest.raises(ConfigError, match="MCP_TOKEN_SECRET"):
        create_app(settings)


@pytest.mark.parametrize(
    ("variable", "value"), [("auth_audience", MCP_AUDIENCE), ("auth_issuer", MCP_ISSUER)], ids=["audience", "issuer"]
)
def test_api_cannot_be_configured_as_the_mcp_audience(variable: str, value: str) -> None:
    settings = make_settings("postgresql://u@h/db", **{variable: value})
    with pytest.raises(ConfigError, match=variable.upper()):
        settings.validate_for_api()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"exp": str(int(time.time()) + 3600)}, id="exp-string"),
        pytest.param({"nbf": str(int(time.time()) - 60)}, id="nbf-string"),
        pytest.param({"iat": str(int(time.time()))}, id="iat-string"),
        pytest.param({"exp": True}, id="exp-bool"),
        pytest.param({"iat": True}, id="iat-bool"),
        pytest.param({"exp": [int(time.time()) + 3600]}, id="exp-list"),
        pytest.param({"aud": 5}, id="aud-number"),
        pytest.param({"aud": [ISSUER, 5]}, id="aud-list-with-number"),
        pytest.param({"iss": 5}, id="iss-number"),
    ],
)
async def test_claims_of_the_wrong_type_are_rejected_not_coerced(
    client: httpx.AsyncClient, overrides: dict[str, Any]
) -> None:
    now = int(time.time())
    payload = json.dumps({"sub": "alice", "iat": now, "exp": now + 300, **overrides}).encode()
    # Signed as raw bytes: PyJWT's encoder refuses some of these shapes, a forger's would not.
    token = jwt.api_jws.encode(payload, TEST_AUTH_SECRET, algorithm="HS256")
    _assert_401(await _status(client, token))


async def test_fractional_numeric_dates_are_accepted(client: httpx.AsyncClient) -> None:
    # RFC 7519 NumericDate may be non-integer.
    now = time.time()
    assert (await _status(client, user_token("alice", iat=now, exp=now + 300.5))).status_code == 200


# --- JWKS (Better Auth) ---------------------------------------------------------------------------


async def test_jwks_eddsa_rs256_es256(jwks_client: httpx.AsyncClient, jwks: JwksServer, keys: SigningKeys) -> None:
    for key, alg, kid in [(keys.ed, "EdDSA", "ed-1"), (keys.rsa, "RS256", "rsa-1"), (keys.ec, "ES256", "ec-1")]:
        response = await _status(jwks_client, keys.sign(claims(), kid=kid, key=key, alg=alg))
        assert response.status_code == 200, (alg, response.text)
    assert jwks.fetches == 1  # cached


async def test_better_auth_shaped_token(jwks_client: httpx.AsyncClient, keys: SigningKeys) -> None:
    # Header {"alg": "EdDSA", "kid": ...} without typ, the user row in the claims, no nbf/jti.
    payload = claims("Xk2mP9qLr", name="Alice", email="a@example.com", emailVerified=True, id="Xk2mP9qLr")
    token = jwt.encode(payload, keys.ed, algorithm="EdDSA", headers={"kid": "ed-1", "typ": None})
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "==")) == {"alg": "EdDSA", "kid": "ed-1"}
    response = await _status(jwks_client, token)
    assert response.status_code == 200


async def test_jwks_rejections(jwks_client: httpx.AsyncClient, keys: SigningKeys) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    _assert_401(await _status(jwks_client, keys.sign(claims(), key=other)))  # wrong key, known kid
    _assert_401(await _status(jwks_client, keys.sign(claims(exp=int(time.time()) - 60))))
    _assert_401(await _status(jwks_client, keys.sign(claims(iss="http://evil.test"))))
    _assert_401(await _status(jwks_client, keys.sign(claims(aud="http://evil.test"))))
    _assert_401(await _status(jwks_client, keys.sign(claims(sub=None))))
    # A key used with another algorithm than its own: RSA key id, EC signature.
    _assert_401(await _status(jwks_client, keys.sign(claims(), kid="rsa-1", key=keys.ec, alg="ES256")))
    # HS256 is not allowed when only a JWKS is configured.
    _assert_401(await _status(jwks_client, jwt.encode(claims(), "x" * 40, algorithm="HS256")))
    _assert_401(await _status(jwks_client, _alg_none_token(claims())))


async def test_hs_rs_confusion(database_url: str, jwks: JwksServer, keys: SigningKeys) -> None:
    """HS256 signed with the RSA public key as the secret must fail even when HS256 is allowed."""
    settings = jwks_settings(database_url, jwks, auth_secret=TEST_AUTH_SECRET)
    public_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims()).encode())
    signature = _b64(hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
    forged = f"{header}.{body}.{signature}"
    async with api_client(settings) as http:
        _assert_401(await _status(http, forged))
        assert (await _status(http, keys.sign(claims(), kid="rsa-1", key=keys.rsa, alg="RS256"))).status_code == 200


async def test_unknown_kid_then_rotated_jwks(jwks_client: httpx.AsyncClient, jwks: JwksServer) -> None:
    assert (await _status(jwks_client, jwks.keys.sign(claims()))).status_code == 200
    rotated = ed25519.Ed25519PrivateKey.generate()
    token = jwks.keys.sign(claims(), kid="ed-2", key=rotated)
    _assert_401(await _status(jwks_client, token))  # not published yet: refetched, still unknown
    assert jwks.fetches == 2
    jwks.keys.publish(rotated, "ed-2")
    assert (await _status(jwks_client, token)).status_code == 200  # refetched on the unknown kid
    assert jwks.fetches == 3


async def test_unknown_kid_refetch_is_rate_limited(database_url: str, jwks: JwksServer) -> None:
    settings = jwks_settings(database_url, jwks, auth_jwks_refetch_seconds=60)
    async with api_client(settings) as http:
        for i in range(5):
            _assert_401(await _status(http, jwks.keys.sign(claims(), kid=f"made-up-{i}")))
        assert jwks.fetches == 1


async def test_unknown_kid_refetch_is_single_flight(database_url: str, jwks: JwksServer) -> None:
    async with api_client(jwks_settings(database_url, jwks)) as http:
        assert (await _status(http, jwks.keys.sign(claims()))).status_code == 200
        token = jwks.keys.sign(claims(), kid="ed-2", key=jwks.keys.rotate("ed-2"))
        jwks.hold()
        requests = [asyncio.create_task(_status(http, token)) for _ in range(10)]
        await jwks.wait_fetches(2)
        await asyncio.sleep(0.2)  # the other nine reach the cache while the refetch is held
        jwks.release()
        async with asyncio.timeout(30):
            responses = await asyncio.gather(*requests)
        assert [r.status_code for r in responses] == [200] * 10
        assert jwks.fetches == 2


async def test_one_connection_serves_every_fetch(database_url: str, jwks: JwksServer) -> None:
    async with api_client(jwks_settings(database_url, jwks)) as http:
        for i in range(4):
            _assert_401(await _status(http, jwks.keys.sign(claims(), kid=f"made-up-{i}")))
    assert jwks.fetches == 4
    assert len(jwks.peers) == 1


# --- JWKS under a failing identity provider --------------------------------------------------------


async def test_provider_down_from_start_up_is_fetched_once(database_url: str, jwks: JwksServer) -> None:
    """Today: 40 requests, 40 fetches. Now one attempt, then 503s at once until the backoff ends."""
    jwks.status = 503
    settings = jwks_settings(database_url, jwks, auth_jwks_retry_seconds=60)
    token = jwks.keys.sign(claims())
    async with api_client(settings) as http:
        responses = await _burst(http, token, 20)
        responses += [await _status(http, token) for _ in range(20)]
    for response in responses:
        _assert_auth_unavailable(response, max_retry_after=60)
    assert jwks.fetches == 1


async def test_provider_refusing_connections_is_503(database_url: str, jwks: JwksServer) -> None:
    jwks.stop()
    async with api_client(jwks_settings(database_url, jwks)) as http:
        _assert_auth_unavailable(await _status(http, jwks.keys.sign(claims())), max_retry_after=60)


async def test_waiting_for_a_fetch_is_bounded_by_the_fetch_timeout(database_url: str, jwks: JwksServer) -> None:
    """No keys yet and the provider never answers: everyone gets 503 after one timeout, together."""
    jwks.hold()
    settings = jwks_settings(database_url, jwks, auth_jwks_timeout_seconds=0.5, auth_jwks_retry_seconds=60)
    async with api_client(settings) as http:
        responses = await _burst(http, jwks.keys.sign(claims()), 10)
        for response in responses:
            _assert_auth_unavailable(response, max_retry_after=60)
        assert (jwks.fetches, jwks.answered) == (1, 0)  # the provider still holds the only fetch
        jwks.release()


async def test_stale_keys_are_served_while_one_refresh_runs(database_url: str, jwks: JwksServer) -> None:
    """Today: after expiry, 20 concurrent requests queue behind 20 serialised fetches."""
    settings = jwks_settings(database_url, jwks, auth_jwks_cache_seconds=0)
    token = jwks.keys.sign(claims())
    async with api_client(settings) as http:
        assert (await _status(http, token)).status_code == 200
        jwks.hold()
        responses = await _burst(http, token, 20)
        assert [r.status_code for r in responses] == [200] * 20
        # All twenty were answered while the one background refresh was still held by the provider.
        await jwks.wait_fetches(2)
        assert jwks.answered == 1
        jwks.release()
        await jwks.wait_answered(2)
        assert jwks.fetches == 2
        assert (await _status(http, token)).status_code == 200


async def test_failing_provider_keeps_the_keys_and_backs_off(database_url: str, jwks: JwksServer) -> None:
    settings = jwks_settings(database_url, jwks, auth_jwks_cache_seconds=0, auth_jwks_retry_seconds=60)
    token = jwks.keys.sign(claims())
    async with api_client(settings) as http:
        assert (await _status(http, token)).status_code == 200
        jwks.status = 503
        responses = await _burst(http, token, 10)
        await jwks.wait_answered(2)
        responses += [await _status(http, token) for _ in range(20)]
        assert [r.status_code for r in responses] == [200] * 30
        # A kid the cached keys cannot judge while the provider fails: unavailable, not "invalid".
        _assert_auth_unavailable(await _status(http, jwks.keys.sign(claims(), kid="ed-9")), max_retry_after=60)
    assert jwks.fetches == 2


async def test_auth_recovers_when_the_provider_comes_back(database_url: str, jwks: JwksServer) -> None:
    jwks.stop()
    settings = jwks_settings(database_url, jwks, auth_jwks_retry_seconds=0.1, auth_jwks_retry_max_seconds=0.2)
    token = jwks.keys.sign(claims())
    async with api_client(settings) as http:
        _assert_auth_unavailable(await _status(http, token), max_retry_after=1)
        jwks.start()
        async with asyncio.timeout(15):
            while (response := await _status(http, token)).status_code == 503:
                await asyncio.sleep(0.05)
        assert response.status_code == 200


DOC_MARKER = "DOCUMENT-CONTENT-MARKER"

MALFORMED_KEY_SETS = [
    pytest.param({"keys": ["x", 5]}, id="keys-not-objects"),
    pytest.param({}, id="empty-object"),
    pytest.param([], id="array"),
    pytest.param({"keys": []}, id="no-keys"),
    pytest.param({"keys": DOC_MARKER}, id="keys-a-string"),
    pytest.param(f"not json {DOC_MARKER}".encode(), id="not-json"),
    pytest.param(b"\xff\xfe\x00", id="not-utf8"),
    pytest.param({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": DOC_MARKER}]}, id="symmetric-key"),
    pytest.param({"keys": [{"kty": "XYZ", "kid": DOC_MARKER}]}, id="unknown-key-type"),
    pytest.param({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": 5, "kid": DOC_MARKER}]}, id="bad-key-material"),
    pytest.param({"keys": [{"kty": "EC", "crv": "P-256", "kid": DOC_MARKER}]}, id="incomplete-key"),
]


@pytest.mark.parametrize("body", MALFORMED_KEY_SETS)
async def test_malformed_key_set_never_replaces_good_keys(
    database_url: str, jwks: JwksServer, body: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = jwks_settings(database_url, jwks, auth_jwks_cache_seconds=0, auth_jwks_retry_seconds=60)
    token = jwks.keys.sign(claims())
    async with api_client(settings) as http:
        assert (await _status(http, token)).status_code == 200
        caplog.set_level(logging.WARNING, logger="backend.auth")
        caplog.clear()
        jwks.serve_body(body)
        assert (await _status(http, token)).status_code == 200  # stale keys while it refreshes
        await jwks.wait_answered(2)
        assert (await _status(http, token)).status_code == 200  # the bad set did not replace them
    assert jwks.fetches == 2
    warnings = [r for r in caplog.records if r.name == "backend.auth" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert DOC_MARKER not in warnings[0].getMessage()
    assert "not json" not in warnings[0].getMessage()


@pytest.mark.parametrize("body", MALFORMED_KEY_SETS)
async def test_malformed_key_set_without_cached_keys_is_503(database_url: str, jwks: JwksServer, body: Any) -> None:
    jwks.serve_body(body)
    async with api_client(jwks_settings(database_url, jwks)) as http:
        _assert_auth_unavailable(await _status(http, jwks.keys.sign(claims())), max_retry_after=60)


async def test_unusable_keys_are_skipped_next_to_good_ones(database_url: str, jwks: JwksServer) -> None:
    jwks.serve_body({"keys": ["x", {"kty": "XYZ", "kid": "future"}, *jwks.keys.published]})
    async with api_client(jwks_settings(database_url, jwks)) as http:
        assert (await _status(http, jwks.keys.sign(claims()))).status_code == 200
