"""`chat-backend`: the one entry point for every process (dev, serve, mcp, migrate, token)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from alembic.config import Config

from backend.config import ConfigError, Settings

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    location = MIGRATIONS if MIGRATIONS.is_dir() else Path.cwd() / "migrations"
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["database_url"] = database_url
    return cfg


def migrate(settings: Settings) -> None:
    from alembic import command

    command.upgrade(alembic_config(settings.require_database_url()), "head")


def mint_user_token(settings: Settings, user: str, ttl: int) -> str:
    import jwt

    secret = settings.resolved_auth_secret()
    if not secret:
        raise ConfigError(
            "The API verifies tokens from AUTH_JWKS_URL only; get a token from Better Auth "
            "(GET /api/auth/token) or set AUTH_SECRET to mint one here"
        )
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, "iat": now, "exp": now + ttl}
    if settings.auth_issuer:
        claims["iss"] = settings.auth_issuer
    if settings.auth_audience:
        claims["aud"] = settings.auth_audience
    hs = [alg for alg in settings.algorithms if alg.startswith("HS")]
    return jwt.encode(claims, secret, algorithm=hs[0] if hs else "HS256")


def _serve_api(settings: Settings) -> None:
    import uvicorn

    from backend.main import create_app

    settings.validate_for_api()
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        # Longer than any load balancer's idle timeout (nginx, ALB: 60 s), so the server is never the
        # one closing a kept-alive connection just as a request arrives on it (a reset under load).
        timeout_keep_alive=75,
        timeout_graceful_shutdown=10,
    )


def _serve_mcp(settings: Settings) -> None:
    import uvicorn

    from backend.mcp_server.app import create_mcp_app

    settings.validate_for_mcp()
    uvicorn.run(
        create_mcp_app(settings),
        host=settings.mcp_bind_host or settings.mcp_host,
        port=settings.mcp_port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )


def _dev(settings: Settings) -> int:
    """Embedded PostgreSQL (unless DATABASE_URL), migrations, MCP server and API; Ctrl-C stops all."""
    from backend.pgserver import ensure_database, start_embedded, stop_embedded, with_database

    os.environ["APP_ENV"] = "dev"
    embedded = not settings.database_url
    if embedded:
        print(f"Starting embedded PostgreSQL (data in {settings.data_dir / 'pg'}) ...", flush=True)
        admin = start_embedded(settings.data_dir)
        ensure_database(admin, "chat")
        os.environ["DATABASE_URL"] = with_database(admin, "chat")
    settings = Settings(app_env="dev")
    print("Running migrations ...", flush=True)
    migrate(settings)
    settings.validate_for_api()

    procs = [
        subprocess.Popen([sys.executable, "-m", "backend.cli", "mcp"]),
        subprocess.Popen([sys.executable, "-m", "backend.cli", "serve"]),
    ]
    api = f"http://{settings.api_host}:{settings.api_port}"
    me = sys.argv[0] if sys.argv[0].endswith("chat-backend") else "chat-backend"
    print(
        f"""
  API         {api}        (docs: {api}/docs)
  MCP server  {settings.mcp_url}
  Model       {settings.model_name}
  Database    {"embedded PostgreSQL" if embedded else "DATABASE_URL"}

  Get a token:   TOKEN=$({me} token --user alice)
  Chat:          curl -s {api}/api/chat -H "Authorization: Bearer $TOKEN" \\
                   -H 'content-type: application/json' -d '{{"message": "add buy milk"}}'
  Ctrl-C stops everything.
""",
        flush=True,
    )
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    code = 0
    try:
        while not stopping:
            for proc in procs:
                if proc.poll() is not None:
                    print(f"A child process exited with {proc.returncode}; stopping.", file=sys.stderr)
                    stopping, code = True, 1
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if embedded:
            stop_embedded(settings.data_dir)
        print("Stopped.", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-backend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="embedded PostgreSQL + migrations + MCP server + API (offline model without a key)")
    sub.add_parser("serve", help="run the API (API_HOST:API_PORT)")
    sub.add_parser("mcp", help="run the MCP task server (host, port and path from MCP_URL)")
    sub.add_parser("migrate", help="alembic upgrade head on DATABASE_URL")
    tok = sub.add_parser("token", help="print a JWT the running config accepts (dev secret or AUTH_SECRET)")
    tok.add_argument("--user", required=True, help="the user id (the token's sub)")
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    tok.add_argument("--mcp", action="store_true", help="a delegation token for the MCP server instead")
    args = parser.parse_args(argv)

    if args.command == "token":
        # A newcomer's shell has no APP_ENV: mint with the dev secret the `dev` stack uses.
        os.environ.setdefault("APP_ENV", "dev")
    settings = Settings()
    try:
        if args.command == "dev":
            return _dev(settings)
        if args.command == "serve":
            _serve_api(settings)
        elif args.command == "mcp":
            _serve_mcp(settings)
        elif args.command == "migrate":
            migrate(settings)
        elif args.command == "token":
            if args.mcp:
                from backend.delegation import mint_operator_token

                print(mint_operator_token(settings.resolved_mcp_secret(), args.user, ttl_seconds=args.ttl))
            else:
                print(mint_user_token(settings, args.user, args.ttl))
    except ConfigError as exc:
        print(f"chat-backend {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
