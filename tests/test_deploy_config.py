"""Static checks of the deployment files, no Docker engine needed.

docker-compose.yml, Dockerfile, deploy/nginx.conf and .env.example must stay in step with the code:
commands are real `chat-backend` subcommands, variables are real settings, and ports, health checks
and start-up order agree across the files.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from backend import cli
from backend.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_VARS = {name.upper() for name in Settings.model_fields}
# Read by the image or a library itself, not by Settings.
LIBRARY_VARS = {
    "LITELLM_LOCAL_MODEL_COST_MAP",  # LiteLLM: no cost-map download at import
    "EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER",  # LiteLLM: openai/ without the OpenAI SDK (agent/factory)
    "FORWARDED_ALLOW_IPS",  # uvicorn: whose X-Forwarded-* headers to trust
    "AZURE_API_KEY",  # LiteLLM's azure/* provider
    "AZURE_API_BASE",
    "AZURE_API_VERSION",
}
# Only docker-compose.yml interpolates these.
COMPOSE_VARS = {"POSTGRES_PASSWORD", "API_PUBLISH_PORT"}
BACKEND_SERVICES = ("migrate", "mcp", "api")
# The one service that builds the image; the others run it by name.
BUILDER = "migrate"
VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _interpolate(text: str) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}` with every variable unset."""

    def value(match: re.Match[str]) -> str:
        return match.group(3) if match.group(2) in (":-", "-") else f"placeholder-{match.group(1).lower()}"

    return VAR_REF.sub(value, text)


COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(_interpolate(COMPOSE_TEXT))
SERVICES: dict[str, Any] = COMPOSE["services"]
NGINX = (ROOT / "deploy" / "nginx.conf").read_text()
NGINX_CODE = re.sub(r"#.*", "", NGINX)


def _env(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _health_url(service: str) -> str:
    test = SERVICES[service]["healthcheck"]["test"]
    found = re.findall(r"https?://[^\s'\"]+", " ".join(test) if isinstance(test, list) else test)
    assert len(found) == 1, f"{service}: healthcheck should fetch one URL, found {found}"
    return str(found[0])


def _port(url: str) -> int | None:
    return urlsplit(url).port


def _env_example() -> dict[str, str]:
    """Variables documented in .env.example, set or commented out (`# NAME=value`)."""
    found: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, grouped by build stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), args.strip()))
    return stages


FINAL_STAGE = _dockerfile_stages()[-1]


def _final(keyword: str) -> list[str]:
    return [args for kw, args in FINAL_STAGE if kw == keyword]


def _is_subcommand(name: str) -> bool:
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    return exc.value.code == 0


def test_subcommand_probe_tells_real_from_unknown() -> None:
    assert _is_subcommand("serve")
    assert not _is_subcommand("no-such-command")


@pytest.mark.parametrize("service", BACKEND_SERVICES)
def test_backend_services_run_a_real_subcommand_of_our_image(service: str) -> None:
    spec = SERVICES[service]
    assert spec["image"] == SERVICES[BUILDER]["image"], f"{service} does not run the image {BUILDER} builds"
    command = spec["command"]
    assert isinstance(command, list), f"{service}: use the exec form for command"
    assert _is_subcommand(command[0]), f"{service}: `chat-backend {command[0]}` does not exist"


def test_backend_services_share_one_image_and_run_their_process() -> None:
    assert len({SERVICES[s].get("image") for s in BACKEND_SERVICES}) == 1
    assert [SERVICES[s]["command"][0] for s in BACKEND_SERVICES] == ["migrate", "mcp", "serve"]


def test_the_image_is_built_once() -> None:
    """Several services with `build:` make compose build the image once each: the last build wins the tag,
    and the next `up --scale` or `run` recreates the services whose container names an older image."""
    builders = [name for name, spec in SERVICES.items() if "build" in spec]
    assert builders == [BUILDER], f"only {BUILDER} may build the image, found build: on {builders}"
    assert SERVICES[BUILDER]["build"] in (".", {"context": "."}), "build from the Dockerfile at the root"
    for service in BACKEND_SERVICES:
        # `docker compose up api` must still build the image: the builder is a dependency.
        assert BUILDER in _dependency_closure(service), f"{service} does not depend on {BUILDER}"
        # A local image: `docker compose pull` (for db and lb) must not try a registry for it.
        assert SERVICES[service].get("pull_policy") == "never", f"{service}: pull_policy: never"


def _dependency_closure(service: str) -> set[str]:
    found = {service}
    for name in SERVICES[service].get("depends_on") or {}:
        found |= _dependency_closure(name)
    return found


def test_host_network_build_override_touches_only_the_build() -> None:
    path = ROOT / "deploy" / "compose.build-host-network.yml"
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must say in a comment when it is needed"
    assert f"COMPOSE_FILE=docker-compose.yml:deploy/{path.name}" in text
    assert yaml.safe_load(text) == {"services": {BUILDER: {"build": {"network": "host"}}}}


def test_dockerfile_needs_no_registry_beyond_its_base_image() -> None:
    """A `# syntax=` directive makes every build pull a frontend image; offline builds then fail."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.IGNORECASE | re.MULTILINE)
    bases = {args.split()[0] for stage in _dockerfile_stages() for kw, args in stage if kw == "FROM"}
    assert bases == {"${PYTHON_IMAGE}"}
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.MULTILINE)


def test_dockerfile_installs_dependencies_before_the_code() -> None:
    """The dependency layer reads only pyproject.toml, so a code change rebuilds seconds, not minutes."""
    build = _dockerfile_stages()[0]
    copies = [(i, args) for i, (kw, args) in enumerate(build) if kw == "COPY"]
    first_index, first = copies[0]
    assert first.split()[:-1] == ["pyproject.toml"], f"the first COPY must be pyproject.toml alone: {first}"
    code_index = next(i for i, args in copies if "backend" in args.split()[:-1])
    installs = [args for kw, args in build[first_index:code_index] if kw == "RUN" and "pip install" in args]
    assert installs, "install the dependencies between COPY pyproject.toml and COPY backend"
    assert "tomllib" not in " ".join(installs), "pip reads pyproject.toml itself"


@pytest.mark.parametrize("service", BACKEND_SERVICES)
def test_backend_environment_names_real_settings(service: str) -> None:
    env = _env(service)
    unknown = set(env) - SETTINGS_VARS - LIBRARY_VARS
    assert not unknown, f"{service} sets variables no setting reads: {sorted(unknown)}"
    # Explicit, so a `.env` made for `chat-backend dev` cannot switch on per-container dev secrets.
    assert env["APP_ENV"] == "production"
    db = urlsplit(env["DATABASE_URL"])
    db_env = SERVICES["db"]["environment"]
    assert (db.hostname, db.port, db.username) == ("db", 5432, db_env["POSTGRES_USER"])
    assert db.path == "/" + db_env["POSTGRES_DB"]


def test_compose_interpolates_only_known_variables_and_requires_the_secrets() -> None:
    names = {match.group(1) for match in VAR_REF.finditer(COMPOSE_TEXT)}
    unknown = names - SETTINGS_VARS - LIBRARY_VARS - COMPOSE_VARS
    assert not unknown, f"docker-compose.yml reads unknown variables: {sorted(unknown)}"
    missing = names - set(_env_example())
    assert not missing, f".env.example does not document {sorted(missing)}"
    for required in ("MCP_TOKEN_SECRET", "POSTGRES_PASSWORD"):
        assert re.search(r"\$\{" + required + r":\?", COMPOSE_TEXT), f"{required} must be required (:?)"


def test_env_example_documents_every_setting_and_nothing_else() -> None:
    documented = set(_env_example())
    missing = SETTINGS_VARS - documented
    assert not missing, f".env.example does not document {sorted(missing)}"
    unknown = documented - SETTINGS_VARS - LIBRARY_VARS - COMPOSE_VARS
    assert not unknown, f".env.example documents unknown variables: {sorted(unknown)}"


def test_env_example_holds_no_secret_values() -> None:
    for name, value in _env_example().items():
        if re.search(r"SECRET|_KEY$|PASSWORD", name):
            assert value == "" or value.startswith("<"), f"{name} in .env.example must be empty"


def test_api_port_agrees_across_compose_healthcheck_nginx_and_dockerfile() -> None:
    env = _env("api")
    port = int(env["API_PORT"])
    assert env["API_HOST"] == "0.0.0.0"
    health = _health_url("api")
    assert urlsplit(health).hostname == "127.0.0.1"
    assert _port(health) == port
    upstream = re.findall(r"^\s*server\s+([\w.-]+):(\d+)(.*);", NGINX_CODE, re.MULTILINE)
    assert [(host, int(p)) for host, p, _ in upstream] == [("api", port)]
    assert str(port) in _final("EXPOSE")[0].split()


def test_mcp_url_port_agrees_with_healthcheck_and_dockerfile() -> None:
    mcp, api = _env("mcp"), _env("api")
    assert mcp["MCP_URL"] == api["MCP_URL"], "the API must reach the MCP server where it listens"
    url = urlsplit(mcp["MCP_URL"])
    assert url.hostname == "mcp"
    assert mcp["MCP_BIND_HOST"] == "0.0.0.0"
    assert "mcp" in [host.strip() for host in mcp.get("MCP_ALLOWED_HOSTS", "mcp").split(",")]
    health = _health_url("mcp")
    assert (urlsplit(health).hostname, _port(health)) == ("127.0.0.1", url.port)
    assert str(url.port) in _final("EXPOSE")[0].split()
    assert mcp["MCP_TOKEN_SECRET"] == api["MCP_TOKEN_SECRET"]


def test_healthchecks_use_readiness() -> None:
    for service in ("mcp", "api"):
        assert urlsplit(_health_url(service)).path == "/health/ready"
    assert "pg_isready" in str(SERVICES["db"]["healthcheck"]["test"])


def test_start_up_order() -> None:
    def conditions(service: str) -> dict[str, str]:
        deps = SERVICES[service]["depends_on"]
        return {name: spec["condition"] for name, spec in deps.items()}

    assert conditions("migrate") == {"db": "service_healthy"}
    assert conditions("mcp") == {"migrate": "service_completed_successfully"}
    assert conditions("api") == {"migrate": "service_completed_successfully", "mcp": "service_healthy"}
    assert "api" in conditions("lb")
    assert SERVICES["migrate"].get("restart") == "no", "a one-shot job must not be restarted"


def test_api_scales_behind_nginx() -> None:
    api, lb = SERVICES["api"], SERVICES["lb"]
    assert "ports" not in api, "`--scale api=N` needs no fixed host port"
    assert "container_name" not in api
    (mapping,) = lb["ports"]
    listen = re.findall(r"^\s*listen\s+(\d+)", NGINX_CODE, re.MULTILINE)
    assert listen == [str(mapping).rsplit(":", 1)[1]]
    assert any(v.startswith("./deploy/nginx.conf:") and v.endswith(":ro") for v in lb["volumes"])
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\b", NGINX_CODE, re.MULTILINE)
    assert re.search(r"server\s+api:\d+\s+resolve;", NGINX_CODE), "re-resolve api for scaled replicas"


def test_nginx_streams_sse_and_forwards_client_headers() -> None:
    locations = dict(re.findall(r"location\s+(?:=\s+)?(\S+)\s*\{([^}]*)\}", NGINX_CODE))
    for path in ("/api/chat/stream", "/api/chat/ui", "/chatkit"):
        assert "proxy_buffering off" in locations[path], f"{path} must not be buffered (SSE)"
        assert re.search(r"proxy_read_timeout\s+(\d+[smh]?)", locations[path])
    assert re.search(r"client_max_body_size\s+1m;", NGINX_CODE)
    for header in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"):
        assert re.search(rf"proxy_set_header\s+{header}\s", NGINX_CODE)
    assert all("proxy_set_header" not in body for body in locations.values()), (
        "a location with its own proxy_set_header drops the server-level X-Forwarded-* headers"
    )


def test_nginx_answers_its_own_errors_as_retryable_json() -> None:
    """A replica killed mid-request fails that request with nginx's 502: the client must be able to read
    the same JSON error shape as the API's (`code`, `retryable`) and retry with its client_message_id."""
    pages = dict(re.findall(r"error_page\s+(\d+)\s+(@\w+);", NGINX_CODE))
    assert set(pages) == {"502", "504"}
    # Up to the closing brace on a line of its own: the JSON bodies hold braces.
    named = dict(re.findall(r"location\s+(@\w+)\s*\{(.*?)\n\s*\}", NGINX_CODE, re.DOTALL))
    for status, location in pages.items():
        body = named[location]
        assert "default_type application/json;" in body
        (returned,) = re.findall(r"return\s+(\d+)\s+'([^']*)';", body)
        assert returned[0] == status
        error = json.loads(returned[1].replace("\\n", ""))
        assert error["retryable"] is True and error["code"] and "client_message_id" in error["detail"]
    assert "proxy_intercept_errors" not in NGINX_CODE, "the API's own 502/504 JSON bodies must pass through"


def test_dockerfile_runtime_stage() -> None:
    users = _final("USER")
    assert users, "the runtime stage must set USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert json.loads(_final("ENTRYPOINT")[-1]) == ["chat-backend"]
    (cmd,) = (json.loads(args) for args in _final("CMD"))
    assert _is_subcommand(cmd[0])
    env = " ".join(_final("ENV"))
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in env
    assert "PYTHONUNBUFFERED=1" in env
    assert not re.search(r"apt-get install|build-essential|gcc", " ".join(_final("RUN")))


def test_dockerfile_puts_migrations_in_the_working_directory() -> None:
    """`chat-backend migrate` falls back to ./migrations when the package is installed from a wheel."""
    workdir, copied = "/", []
    for keyword, args in FINAL_STAGE:
        if keyword == "WORKDIR":
            workdir = str(Path(workdir, args))
        elif keyword == "COPY" and not args.startswith("--from"):
            *sources, dest = args.split()
            if "migrations" in sources:
                copied.append(str(Path(workdir, dest)) + ("/migrations" if dest.endswith("/") else ""))
    assert copied == [str(Path(workdir, "migrations"))]


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".data", ".git"} <= ignored


def _smoke() -> ModuleType:
    """deploy/smoke.py, the compose smoke test (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("compose_smoke", ROOT / "deploy" / "smoke.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_smoke_env_is_env_example_with_what_compose_requires() -> None:
    smoke = _smoke()
    example = (ROOT / ".env.example").read_text()
    generated = smoke.make_env(example, smoke.smoke_settings(18000))
    env = smoke.parse_env(generated)
    required = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE_TEXT))
    assert required and all(env.get(name) for name in required), f"compose requires {sorted(required)}"
    assert len(env["AUTH_SECRET"]) >= 32
    assert env["POSTGRES_PASSWORD"].isalnum(), "it goes into DATABASE_URL"
    assert (env["CHAT_MODEL"], env["API_PUBLISH_PORT"]) == ("offline", "18000")
    unknown = set(smoke.smoke_settings(18000)) - SETTINGS_VARS - COMPOSE_VARS
    assert not unknown, f"the smoke test sets variables nothing reads: {sorted(unknown)}"
    assert set(_env_example()) <= _names(generated), "the example's documentation stays"
    again = smoke.parse_env(smoke.make_env(example, smoke.smoke_settings(18000)))
    assert again["MCP_TOKEN_SECRET"] != env["MCP_TOKEN_SECRET"], "every run gets fresh secrets"


def _names(env_text: str) -> set[str]:
    return {match.group(1) for line in env_text.splitlines() if (match := re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line))}


def test_smoke_keeps_the_callers_shell_out_of_the_stack() -> None:
    """Compose prefers the shell's variables over --env-file: an exported model key must not leak in."""
    smoke = _smoke()
    env_text = smoke.make_env((ROOT / ".env.example").read_text(), smoke.smoke_settings(18000))
    shell = {"PATH": "/usr/bin", "COMPOSE_FILE": "a.yml:b.yml", "GEMINI_API_KEY": "real", "CORS_ORIGINS": "x"}
    env = smoke.compose_environment(env_text, shell, Path("/tmp/smoke.yml"))
    assert (env["PATH"], env["COMPOSE_FILE"]) == ("/usr/bin", "a.yml:b.yml:/tmp/smoke.yml")
    assert env["GEMINI_API_KEY"] == "" and env["CHAT_MODEL"] == "offline"
    assert "CORS_ORIGINS" not in env
    bare = smoke.compose_environment(env_text, {"PATH": "/usr/bin"}, Path("/tmp/smoke.yml"))
    assert bare["COMPOSE_FILE"] == "docker-compose.yml:/tmp/smoke.yml"


def test_smoke_containers_read_the_generated_env_file_not_the_checkouts() -> None:
    smoke = _smoke()
    readers = sorted(name for name, spec in SERVICES.items() if "env_file" in spec)
    assert readers == sorted(smoke.ENV_FILE_SERVICES)
    override = smoke.env_file_override(Path("/tmp/x/.env"))
    assert override.count("env_file: !override") == len(readers)

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node, deep=True))
    parsed = yaml.load(override, Loader=Loader)
    assert parsed == {"services": {name: {"env_file": [{"path": "/tmp/x/.env"}]} for name in readers}}


def test_readme_compose_section_names_the_smoke_test_and_the_override() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Docker Compose", 1)[1].split("\n## ", 1)[0]
    for needle in ("python deploy/smoke.py", "deploy/compose.build-host-network.yml", "client_message_id", "502"):
        assert needle in section, f"the README's Docker Compose section should mention {needle}"
