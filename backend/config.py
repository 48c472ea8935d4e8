"""Settings: one pydantic-settings object read from env vars and `.env`.

Every process (`serve`, `mcp`, `migrate`, `dev`, tests) builds its own `Settings`; nothing reads
`os.environ` anywhere else. Secrets have no usable default outside `dev`: `validate_for_runtime()`
turns a missing one into a start-up error that names the variable.
"""

from __future__ import annotations

import json
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

OFFLINE_MODEL = "offline"
DEFAULT_GEMINI_MODEL = "gemini/gemini-2.5-flash"
MCP_AUDIENCE = "chat-backend-mcp"
MCP_ISSUER = "chat-backend-api"


class ConfigError(RuntimeError):
    """A setting is missing or inconsistent; the message names the variable."""


def _csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_ignore_empty=True)

    # "dev" allows generated secrets (kept under DATA_DIR); anything else refuses to start without them.
    app_env: Literal["dev", "production"] = "production"
    data_dir: Path = Path(".data")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # GET /metrics on the API and the MCP server; with a token, only for `Authorization: Bearer <token>`.
    metrics_enabled: bool = True
    metrics_token: str | None = None

    database_url: str | None = None
    db_pool_size: int = 10
    db_max_overflow: int = 20
    # How long one unit of database work may take (a stalled server answers 503 after this), and the
    # server-side statement and lock timeouts.
    db_timeout_seconds: float = 5.0
    db_statement_timeout_seconds: float = 5.0

    # Auth (Better Auth JWKS and/or an HS256 shared secret).
    auth_jwks_url: str | None = None
    auth_secret: str | None = None
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_algorithms: Annotated[list[str], NoDecode] = Field(default_factory=list)
    auth_leeway_seconds: int = 5
    auth_jwks_cache_seconds: int = 600
    auth_jwks_refetch_seconds: float = 30.0
    auth_jwks_timeout_seconds: float = 5.0
    # After a failed JWKS fetch: wait this long, doubling per failure up to the max.
    auth_jwks_retry_seconds: float = 2.0
    auth_jwks_retry_max_seconds: float = 30.0

    # Model.
    chat_model: str | None = None
    gemini_api_key: str | None = None
    model_api_key: str | None = None
    model_api_base: str | None = None
    model_timeout_seconds: float = 60.0
    model_max_retries: int = 2
    model_temperature: float | None = None
    agent_max_turns: int = 8
    turn_timeout_seconds: float = 120.0
    history_max_messages: int = 40
    history_max_chars: int = 24_000
    tracing_enabled: bool = False

    # MCP.
    mcp_url: str = "http://127.0.0.1:8001/mcp"
    mcp_token_secret: str | None = None
    # A turn token only works while its turn holds the lease; this just bounds a token that leaks.
    mcp_token_ttl_seconds: int = 150  # TURN_TIMEOUT_SECONDS + 30
    mcp_timeout_seconds: float = 15.0
    mcp_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Where `chat-backend mcp` binds; defaults to MCP_URL's host (0.0.0.0 in a container).
    mcp_bind_host: str | None = None

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = 64_000
    # `/api/chat/ui` only: the AI SDK's transport sends the whole chat every time (only the newest
    # message is read), so a long chat needs more room than one message does.
    max_ui_body_bytes: int = 1_000_000
    turn_lease_seconds: float = 30.0
    sse_heartbeat_seconds: float = 10.0
    # A stream whose client stops reading is ended (stored as aborted) after this long without progress.
    sse_send_timeout_seconds: float = 30.0

    # Per-user limits on what costs money, enforced across replicas in PostgreSQL. 0 turns a limit off.
    user_turns_per_minute: int = 30
    user_tokens_per_day: int = 0
    user_concurrent_turns: int = 0

    # HTTP servers of `serve` and `mcp` (backend/server.py).
    web_concurrency: int | None = Field(default=None, ge=1, le=64)  # API worker processes; None: CPUs, at most 8
    max_header_bytes: int = Field(default=16_384, ge=1024)
    max_header_count: int = Field(default=100, ge=8)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    keep_alive_seconds: int = Field(default=75, ge=1)

    @field_validator("database_url")
    @classmethod
    def _psycopg2_driver(cls, value: str | None) -> str | None:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; this project ships psycopg2.
        if value:
            for prefix in ("postgres://", "postgresql://"):
                if value.startswith(prefix):
                    value = "postgresql+psycopg2://" + value.removeprefix(prefix)
                    break
            _check_database_url(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_log_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("auth_algorithms", "mcp_allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        return _csv(value)

    @property
    def is_dev(self) -> bool:
        return self.app_env == "dev"

    @property
    def model_name(self) -> str:
        """The LiteLLM model string, or `offline` when no model or key is configured."""
        if self.chat_model:
            return self.chat_model
        return DEFAULT_GEMINI_MODEL if self.gemini_api_key else OFFLINE_MODEL

    @property
    def algorithms(self) -> list[str]:
        if self.auth_algorithms:
            return self.auth_algorithms
        algs: list[str] = []
        if self.resolved_auth_secret():
            algs.append("HS256")
        if self.auth_jwks_url:
            algs += ["EdDSA", "ES256", "RS256"]
        return algs

    @property
    def mcp_host(self) -> str:
        return urlsplit(self.mcp_url).hostname or "127.0.0.1"

    @property
    def mcp_port(self) -> int:
        parts = urlsplit(self.mcp_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def mcp_path(self) -> str:
        return urlsplit(self.mcp_url).path.rstrip("/") or "/mcp"

    @property
    def mcp_base_url(self) -> str:
        parts = urlsplit(self.mcp_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def workers(self) -> int:
        """API worker processes: WEB_CONCURRENCY, else the CPUs this process may use, at most 8."""
        return self.web_concurrency or min(usable_cpus(), 8)

    @property
    def dev_secrets_path(self) -> Path:
        return self.data_dir / "dev-secrets.json"

    @cached_property
    def _dev_secrets(self) -> dict[str, str]:
        """Random secrets for `dev`, generated once and kept in DATA_DIR so `token` and `serve` agree."""
        path = self.dev_secrets_path
        if path.exists():
            stored: dict[str, str] = json.loads(path.read_text())
            return stored
        values = {"auth_secret": secrets.token_urlsafe(32), "mcp_token_secret": secrets.token_urlsafe(32)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
        path.chmod(0o600)
        return values

    def resolved_auth_secret(self) -> str | None:
        if self.auth_secret or self.auth_jwks_url or not self.is_dev:
            return self.auth_secret
        return self._dev_secrets["auth_secret"]

    def resolved_mcp_secret(self) -> str:
        if self.mcp_token_secret:
            return self.mcp_token_secret
        if self.is_dev:
            return self._dev_secrets["mcp_token_secret"]
        raise ConfigError("MCP_TOKEN_SECRET is not set: the API and the MCP server need the same secret")

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set (e.g. postgresql://user:pass@host:5432/db)")
        return self.database_url

    def validate_for_api(self) -> None:
        """Fail fast, naming the variable, before the API accepts traffic."""
        self.require_database_url()
        if not (self.resolved_auth_secret() or self.auth_jwks_url):
            raise ConfigError("Set AUTH_JWKS_URL (Better Auth JWKS) or AUTH_SECRET (HS256 shared secret)")
        secret = self.resolved_auth_secret()
        if secret and len(secret) < 32 and not self.is_dev:
            raise ConfigError("AUTH_SECRET must be at least 32 characters")
        unknown = set(self.algorithms) - {"HS256", "HS384", "HS512", "EdDSA", "ES256", "ES384", "RS256", "PS256"}
        if unknown:
            raise ConfigError(f"AUTH_ALGORITHMS has unsupported values: {sorted(unknown)}")
        self.resolved_mcp_secret()
        model = self.model_name
        if model.startswith("gemini/") and not (self.gemini_api_key or self.model_api_key):
            raise ConfigError(f"CHAT_MODEL={model} needs GEMINI_API_KEY")
        if self.auth_audience == MCP_AUDIENCE or self.auth_issuer == MCP_ISSUER:
            raise ConfigError(
                f"AUTH_AUDIENCE and AUTH_ISSUER must not be the MCP server's ({MCP_AUDIENCE}, {MCP_ISSUER})"
            )
        self._check_secrets_apart()

    def validate_for_mcp(self) -> None:
        self.require_database_url()
        self.resolved_mcp_secret()
        self._check_secrets_apart()

    def _check_secrets_apart(self) -> None:
        # With one secret for both, anyone holding a delegation token's key could mint user tokens.
        if self.resolved_auth_secret() == self.resolved_mcp_secret():
            raise ConfigError("AUTH_SECRET and MCP_TOKEN_SECRET must be different secrets")


def _check_database_url(url: str) -> None:
    """Refuse a DATABASE_URL this project cannot use, in words (never echoing it: it may hold a password)."""
    example = "e.g. postgresql://user:password@host:5432/database"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(f"is not a database URL ({example})") from None
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"must be a PostgreSQL URL, not {parsed.get_backend_name()}:// ({example})")
    if parsed.drivername != "postgresql+psycopg2":
        raise ValueError(f"uses the driver {parsed.drivername!r}; this project ships psycopg2 (use postgresql://)")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValueError(f"has the port {parsed.port}, outside 1-65535")


# Values never repeated in an error message.
_SECRET_FIELDS = {
    "database_url",
    "auth_secret",
    "mcp_token_secret",
    "gemini_api_key",
    "model_api_key",
    "metrics_token",
}


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each variable that failed, e.g. `LOG_LEVEL: Input should be 'DEBUG', ... (got 'loud')`."""
    problems = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if field and field not in _SECRET_FIELDS and error["type"] != "value_error":
            message += f" (got {error['input']!r})"
        separator = " " if error["type"] == "value_error" else ": "  # "DATABASE_URL is not ..." reads on
        problems.append(f"{field.upper()}{separator}{message}")
    return "; ".join(problems)


def load_settings(**values: Any) -> Settings:
    """`Settings(**values)` with a bad variable turned into a one-line `ConfigError` that names it."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except SettingsError as exc:  # a value pydantic-settings could not even decode
        raise ConfigError(str(exc)) from None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return max(count, 1)
    if quota != "max" and int(period) > 0:
        count = min(count, -(-int(quota) // int(period)))  # a 1.5-CPU quota still gets 2 workers
    return max(count, 1)
