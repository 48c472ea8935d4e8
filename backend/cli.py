"""`chat-backend`: the one entry point for every process (dev, serve, mcp, migrate, token)."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from alembic.config import Config

from backend.config import ConfigError, Settings, load_settings
from backend.dev_instance import DevAlreadyRunning, DevInstance, claim, records_dir, running_instances

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Stands in for the embedded server's URL when `dev` checks the rest of its settings before starting it.
_PLACEHOLDER_DB = "postgresql+psycopg2://embedded/chat"


class CommandError(RuntimeError):
    """A command cannot go on for a reason that is not a setting (a database that does not answer, ...)."""


def alembic_config(database_url: str) -> Config:
    location = MIGRATIONS if MIGRATIONS.is_dir() else Path.cwd() / "migrations"
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["database_url"] = database_url
    return cfg


def migrate(settings: Settings) -> None:
    from alembic import command
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    url = settings.require_database_url()
    try:
        command.upgrade(alembic_config(url), "head")
    except OperationalError as exc:
        where = make_url(url)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise CommandError(
            f"cannot reach the database of DATABASE_URL (host {where.host or 'local socket'}, port "
            f"{where.port or 5432}, database {where.database or '(default)'}): {reason}"
        ) from None


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


def _serve_api(settings: Settings, workers: int | None) -> None:
    from backend.logging_setup import configure_logging
    from backend.server import api_config, metrics_dir, run

    settings.validate_for_api()  # in this process, so a bad setting is one line, not a traceback per worker
    configure_logging(settings)
    config = api_config(settings, workers)
    with metrics_dir(config.workers):
        run(config)


def _serve_mcp(settings: Settings) -> None:
    # One process: its metrics stay in memory, never in a directory an API's workers may share.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from backend.logging_setup import configure_logging
    from backend.mcp_server.app import create_mcp_app
    from backend.server import freeze_after_startup, mcp_config, run

    settings.validate_for_mcp()
    configure_logging(settings)  # before the MCP SDK's own basicConfig, which then leaves it alone
    run(mcp_config(settings, freeze_after_startup(create_mcp_app(settings))))


# --- token ---------------------------------------------------------------------------------------


def _token_settings(mcp: bool) -> Settings:
    """The settings whose secrets the running stack uses: this directory's, else the running `dev`'s."""
    settings = load_settings()
    configured = settings.mcp_token_secret if mcp else (settings.auth_secret or settings.auth_jwks_url)
    if configured or not settings.is_dev or settings.dev_secrets_path.exists():
        return settings
    running = running_instances()
    if len(running) == 1:
        dev = running[0]
        print(f"(using the secrets of the running `chat-backend dev`: {dev.describe()})", file=sys.stderr)
        return load_settings(_env_file=Path(dev.cwd) / ".env", data_dir=Path(dev.data_dir))
    if running:
        listed = "; ".join(dev.describe() for dev in running)
        raise ConfigError(
            f"{len(running)} `chat-backend dev` instances are running ({listed}): run this in the directory of "
            "the one you want, or set DATA_DIR to its data directory"
        )
    raise ConfigError(
        f"no dev secrets to sign with: {settings.dev_secrets_path.resolve()} does not exist and no running "
        f"`chat-backend dev` is recorded in {records_dir()}. Start `chat-backend dev` first, run this in its "
        "directory, or set DATA_DIR (or AUTH_SECRET / MCP_TOKEN_SECRET)"
    )


def _token(args: argparse.Namespace) -> None:
    settings = _token_settings(args.mcp)
    if args.mcp:
        from backend.delegation import OPERATOR_MAX_TTL_SECONDS, OPERATOR_TTL_SECONDS, mint_operator_token

        ttl = args.ttl or OPERATOR_TTL_SECONDS
        if ttl > OPERATOR_MAX_TTL_SECONDS:
            raise CommandError(f"--ttl: an operator token lives at most {OPERATOR_MAX_TTL_SECONDS} seconds")
        print(mint_operator_token(settings.resolved_mcp_secret(), args.user, ttl_seconds=ttl))
    else:
        print(mint_user_token(settings, args.user, args.ttl or 3600))


# --- dev -----------------------------------------------------------------------------------------


class _Stop(BaseException):  # not Exception: no library `except Exception` may swallow it
    """Raised by the signal handlers so every `finally` of `dev` runs."""


@contextmanager
def _signals_stop() -> Iterator[list[bool]]:
    """SIGINT/SIGTERM/SIGHUP raise `_Stop` once; set the yielded flag to ignore them while cleaning up."""
    stopping = [False]

    def handler(_signum: int, _frame: FrameType | None) -> None:
        if not stopping[0]:
            stopping[0] = True
            raise _Stop

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield stopping
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _die_with_parent() -> None:
    """In a child of `dev` (before exec): get SIGTERM when `dev` dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _check_ports_free(settings: Settings) -> None:
    from backend.pgserver import tcp_reachable

    for name, host, port in (
        ("API_PORT", settings.api_host, settings.api_port),
        ("MCP_URL", settings.mcp_host, settings.mcp_port),
    ):
        if tcp_reachable(host, port):
            raise ConfigError(f"{host}:{port} ({name}) is already in use by another program; set {name} to a free port")


def _dev() -> int:
    """Embedded PostgreSQL (unless DATABASE_URL), migrations, MCP server and API; every exit stops all."""
    os.environ["APP_ENV"] = "dev"
    settings = load_settings(app_env="dev")
    # Everything but the database is checked before anything starts.
    load_settings(app_env="dev", database_url=settings.database_url or _PLACEHOLDER_DB).validate_for_api()
    api = f"http://{settings.api_host}:{settings.api_port}"
    me = DevInstance(os.getpid(), str(Path.cwd()), str(settings.data_dir.resolve()), api, settings.mcp_url)
    with _signals_stop() as stopping:
        try:
            with claim(me):
                _check_ports_free(settings)
                embedded = not settings.database_url
                procs: list[subprocess.Popen[bytes]] = []
                try:
                    return _run_dev(settings, embedded, procs, api)
                finally:
                    stopping[0] = True
                    _stop_children(procs)
                    if embedded:
                        from backend.pgserver import stop_embedded

                        stop_embedded(settings.data_dir)
                    print("Stopped.", flush=True)
        except _Stop:
            return 0


def _run_dev(settings: Settings, embedded: bool, procs: list[subprocess.Popen[bytes]], api: str) -> int:
    from backend.pgserver import ensure_database, start_embedded, with_database

    if embedded:
        print(f"Starting embedded PostgreSQL (data in {settings.data_dir / 'pg'}) ...", flush=True)
        admin = start_embedded(settings.data_dir)
        ensure_database(admin, "chat")
        os.environ["DATABASE_URL"] = with_database(admin, "chat")
    settings = load_settings(app_env="dev")
    print("Running migrations ...", flush=True)
    migrate(settings)
    settings.validate_for_api()

    # One API worker unless WEB_CONCURRENCY says otherwise: a first try needs no more.
    env = {**os.environ, "WEB_CONCURRENCY": os.environ.get("WEB_CONCURRENCY") or "1"}
    for command in ("mcp", "serve"):
        argv = [sys.executable, "-m", "backend.cli", command]
        procs.append(subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent))  # noqa: S603
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
    while True:
        for proc in procs:
            if proc.poll() is not None:
                print(f"A child process exited with {proc.returncode}; stopping.", file=sys.stderr, flush=True)
                return 1
        time.sleep(0.2)


def _stop_children(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the command line ----------------------------------------------------------------------------

COMMANDS: dict[str, tuple[str, str]] = {
    "dev": (
        "everything for a first try: embedded PostgreSQL, migrations, MCP server, API",
        "Start the whole stack on this machine for a first try: an embedded PostgreSQL (data under\n"
        "DATA_DIR/pg, default .data/pg) unless DATABASE_URL is set, the migrations, the MCP server\n"
        "(MCP_URL) and the API (API_HOST:API_PORT, one worker unless WEB_CONCURRENCY is set), with the\n"
        "offline model unless a model key is configured. Secrets are generated once into\n"
        "DATA_DIR/dev-secrets.json. Prints the URLs and how to get a token. Ctrl-C (or SIGTERM) stops\n"
        "all of it, PostgreSQL included; the data stays for the next start. A second `dev` on the\n"
        "same DATA_DIR refuses and names the running one.",
    ),
    "serve": (
        "run the API server (API_HOST:API_PORT)",
        "Run the API (REST, SSE, ChatKit) on API_HOST:API_PORT with WEB_CONCURRENCY worker processes\n"
        "(default: the CPUs this process may use, at most 8). Needs DATABASE_URL, AUTH_JWKS_URL or\n"
        "AUTH_SECRET, and MCP_TOKEN_SECRET (outside APP_ENV=dev); a missing or bad setting stops it\n"
        "with one line naming the variable. Does not run migrations (see `migrate`).",
    ),
    "mcp": (
        "run the MCP task server (host, port and path from MCP_URL)",
        "Run the MCP task server (streamable HTTP, stateless) on MCP_URL's port and path, bound to\n"
        "MCP_BIND_HOST (default: MCP_URL's host). It owns the task tables and accepts only delegation\n"
        "tokens signed with MCP_TOKEN_SECRET (the API mints one per turn; `token --mcp` mints a\n"
        "short-lived operator token for trying it with an MCP client). Needs DATABASE_URL and\n"
        "MCP_TOKEN_SECRET.",
    ),
    "migrate": (
        "apply the database migrations (alembic upgrade head)",
        "Bring the database of DATABASE_URL to the newest schema (alembic upgrade head). Safe to run\n"
        "again: applied migrations are skipped. Run it before starting new `serve`/`mcp` versions.",
    ),
    "token": (
        "print a JWT the running config accepts (dev secret or AUTH_SECRET)",
        "Print a signed JWT for --user that the running API accepts, for curl and API clients. It signs\n"
        "with AUTH_SECRET when set; otherwise (APP_ENV unset or dev) with the dev secret in\n"
        "DATA_DIR/dev-secrets.json, or, when there is none here, with that of the running\n"
        "`chat-backend dev` (found through its record under $XDG_STATE_HOME/chat-backend). With\n"
        "--mcp, an operator token for the MCP server (MCP_TOKEN_SECRET) instead, for MCP Inspector\n"
        "and other MCP clients: bound to no turn, so it lives 5 minutes unless --ttl says otherwise\n"
        "(at most an hour).",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat-backend",
        description="The task-chat backend's processes. Settings come from environment variables and .env "
        "(see the README's configuration reference). `chat-backend COMMAND --help` says more.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {
        name: sub.add_parser(name, help=short, description=long, formatter_class=argparse.RawDescriptionHelpFormatter)
        for name, (short, long) in COMMANDS.items()
    }
    parsers["serve"].add_argument(
        "--workers", type=int, metavar="N", help="worker processes (overrides WEB_CONCURRENCY; default: CPUs, max 8)"
    )
    tok = parsers["token"]
    tok.add_argument("--user", required=True, help="the user id (the token's sub)")
    tok.add_argument("--ttl", type=int, help="lifetime in seconds (default 3600; with --mcp 300, at most 3600)")
    tok.add_argument("--mcp", action="store_true", help="a short-lived operator token for the MCP server instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.command == "token":
        # A newcomer's shell has no APP_ENV: mint with the dev secret the `dev` stack uses.
        os.environ.setdefault("APP_ENV", "dev")
    try:
        if args.command == "dev":
            return _dev()
        if args.command == "token":
            _token(args)
            return 0
        settings = load_settings()
        if args.command == "serve":
            _serve_api(settings, args.workers)
        elif args.command == "mcp":
            _serve_mcp(settings)
        elif args.command == "migrate":
            migrate(settings)
    except ConfigError as exc:
        print(f"chat-backend {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except (CommandError, DevAlreadyRunning) as exc:
        print(f"chat-backend {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
