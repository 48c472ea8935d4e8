#!/usr/bin/env python3
"""Compose smoke test: the stack of docker-compose.yml built, scaled, broken and restarted for real.

The pytest suite proves the code and tests/test_deploy_config.py reads the deployment files; this runs
them on a Docker engine: one build, a healthy start, chat through nginx, `--scale` that recreates
nothing, a killed replica that loses no acknowledged turn, data kept across `down`/`up`, and a second
`up --build` that changes nothing. It takes minutes and needs an engine, so it is an opt-in script:

    python deploy/smoke.py          # from anywhere; honours COMPOSE_FILE, DOCKER_HOST, DOCKER_CONTEXT

It runs its own compose project (`chat-backend-smoke`, so a stack you run yourself is left alone) on a
free host port, with a generated env file (.env.example plus fresh secrets and CHAT_MODEL=offline, in
a temporary directory, never in the checkout) that both compose and the containers read instead of
./.env, and removes its containers and volumes at the end.
Standard library only: any Python 3.11+ runs it, no virtualenv needed.
Exit status: 0 every check passed, 1 a check failed, 2 no Docker engine or compose plugin (skipped).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
USER_AGENT = "compose-smoke"
# Statuses a careful client retries with the same client_message_id: no HTTP answer (0), a turn still
# leased by a dead replica (409), the proxy losing the replica (502), a dependency down (503), timeouts.
RETRYABLE = {0, 409, 502, 503, 504}
RETRY_BUDGET_SECONDS = 90.0  # above TURN_LEASE_SECONDS (30 s): a dead replica's lease must expire
ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")
VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


class SmokeError(Exception):
    """A check failed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeError(message)


# ---------------------------------------------------------------- the generated env file


def smoke_settings(port: int) -> dict[str, str]:
    """What the smoke stack needs beyond .env.example: fresh secrets, the offline model, no per-user turn
    limit, a free port."""
    return {
        "POSTGRES_PASSWORD": secrets.token_hex(16),  # letters and digits: it goes into a URL
        "MCP_TOKEN_SECRET": secrets.token_hex(32),
        "AUTH_SECRET": secrets.token_hex(32),  # lets `chat-backend token` mint tokens the API accepts
        "CHAT_MODEL": "offline",  # containers have no outside access in locked-down environments
        # The kill step sends a few hundred turns a minute as one user: the per-user limit would refuse them.
        "USER_TURNS_PER_MINUTE": "0",
        "API_PUBLISH_PORT": str(port),
    }


def make_env(example: str, settings: Mapping[str, str]) -> str:
    """`.env.example` with `settings` filled in (uncommented where the example comments the line out)."""
    lines: list[str] = []
    done: set[str] = set()
    for line in example.splitlines():
        match = ENV_LINE.match(line)
        name = match.group(1) if match else ""
        if name in settings and name not in done:
            lines.append(f"{name}={settings[name]}")
            done.add(name)
        else:
            lines.append(line)
    lines += [f"{name}={value}" for name, value in settings.items() if name not in done]
    return "\n".join(lines) + "\n"


def parse_env(text: str) -> dict[str, str]:
    """The variables an env file sets (commented-out lines set nothing)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = ENV_LINE.match(line)
        if match and not line.startswith("#"):
            found[match.group(1)] = match.group(2).strip()
    return found


def compose_environment(env_text: str, base: Mapping[str, str], override: Path) -> dict[str, str]:
    """The environment for `docker compose`: the shell's, minus anything the compose file interpolates,
    with `override` added to the compose files (COMPOSE_FILE, or docker-compose.yml when unset).

    Compose prefers the shell's variables over `--env-file`; a GEMINI_API_KEY or CHAT_MODEL exported in
    the caller's shell must not leak into the smoke stack.
    """
    interpolated = set(VAR_REF.findall((ROOT / "docker-compose.yml").read_text()))
    env = {name: value for name, value in base.items() if name not in interpolated}
    env.update(parse_env(env_text))
    separator = base.get("COMPOSE_PATH_SEPARATOR", os.pathsep)
    files = base.get("COMPOSE_FILE") or "docker-compose.yml"
    env["COMPOSE_FILE"] = f"{files}{separator}{override}"
    return env


# The services whose containers read `.env` (docker-compose.yml's env_file).
ENV_FILE_SERVICES = ("migrate", "mcp", "api")


def env_file_override(env_file: Path) -> str:
    """A compose file that makes the containers read the generated env file instead of ./.env, so the
    checkout's own .env (if any) stays out of the smoke stack. `!override` needs compose 2.24.4+."""
    lines = ["services:"]
    for service in ENV_FILE_SERVICES:
        lines += [f"  {service}:", "    env_file: !override", f"      - path: {json.dumps(str(env_file))}"]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- docker and compose


def run(cmd: list[str], env: Mapping[str, str] | None = None, timeout: float = 900, stderr: bool = False) -> str:
    """Run a docker command from the repository root: its stdout (and stderr), or SmokeError with both."""
    proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
        cmd, cwd=ROOT, env=None if env is None else dict(env), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise SmokeError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}".rstrip())
    return proc.stdout + proc.stderr if stderr else proc.stdout


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    service: str
    status: str  # running, exited, ...
    health: str  # healthy, starting, unhealthy, or "" without a healthcheck
    exit_code: int
    started_at: str
    image: str
    ip: str


class Compose:
    def __init__(self, project: str, env_file: Path, env: Mapping[str, str]) -> None:
        self.project, self.env_file, self.env = project, env_file, env

    def __call__(self, *args: str, timeout: float = 900, stderr: bool = False) -> str:
        base = ["docker", "compose", "--project-name", self.project, "--env-file", str(self.env_file)]
        return run([*base, *args], self.env, timeout, stderr)

    def containers(self) -> dict[str, Container]:
        ids = self("ps", "--all", "--quiet").split()
        if not ids:
            return {}
        found: dict[str, Container] = {}
        for item in json.loads(run(["docker", "inspect", *ids])):
            state = item["State"]
            networks = item["NetworkSettings"]["Networks"] or {}
            found[item["Id"]] = Container(
                id=item["Id"],
                name=item["Name"].lstrip("/"),
                service=item["Config"]["Labels"].get("com.docker.compose.service", ""),
                status=state["Status"],
                health=(state.get("Health") or {}).get("Status", ""),
                exit_code=int(state["ExitCode"]),
                started_at=state["StartedAt"],
                image=item["Image"],
                ip=next((n["IPAddress"] for n in networks.values() if n.get("IPAddress")), ""),
            )
        return found


def running(containers: Mapping[str, Container], service: str) -> list[Container]:
    return sorted((c for c in containers.values() if c.service == service and c.status == "running"), key=_by_name)


def _by_name(container: Container) -> str:
    return container.name


def unchanged(before: Mapping[str, Container], after: Mapping[str, Container], what: str) -> list[str]:
    """Containers `what` recreated (a new id) or restarted (a new start time).

    An exited one-shot job (`migrate`) may run again in its own container: `up` starts every service.
    """
    changed = []
    for cid, old in before.items():
        new = after.get(cid)
        if new is None:
            changed.append(f"{old.name} was recreated or removed by {what}")
        elif old.status == "running" and (new.status != "running" or new.started_at != old.started_at):
            changed.append(f"{old.name} was restarted by {what}")
    return changed


def reran(before: Mapping[str, Container], after: Mapping[str, Container]) -> str:
    jobs = [
        c.name
        for cid, c in before.items()
        if c.status == "exited" and cid in after and after[cid].started_at != c.started_at
    ]
    return f"; one-shot job re-ran in its own container: {', '.join(jobs)}" if jobs else ""


def attempts(statuses: list[int]) -> str:
    """[502, 409, 409, 200] -> "502, 409 x2, 200"."""
    runs: list[tuple[int, int]] = []
    for status in statuses:
        if runs and runs[-1][0] == status:
            runs[-1] = (status, runs[-1][1] + 1)
        else:
            runs.append((status, 1))
    return ", ".join(f"{status} x{n}" if n > 1 else str(status) for status, n in runs)


# ---------------------------------------------------------------- HTTP through the balancer


@dataclass(frozen=True)
class Reply:
    status: int  # 0: no HTTP response (connection refused, reset, timeout)
    body: Any


# No proxy: the smoke stack is on this host, whatever http_proxy says.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str, url: str, token: str | None = None, body: object = None, tag: str = "", timeout: float = 60
) -> Reply:
    headers = {"User-Agent": f"{USER_AGENT} {tag}".strip(), "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - http only
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return Reply(response.status, _decode(response.read()))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, _decode(exc.read()))
    except (OSError, urllib.error.URLError) as exc:  # reset, refused, timeout, RemoteDisconnected
        return Reply(0, repr(exc))


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


# ---------------------------------------------------------------- reporting


class Steps:
    """Prints each step with its duration and the time since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.timings: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        began = time.monotonic()
        print(f"[{began - self.start:7.1f}s] {title}", flush=True)
        yield
        took = time.monotonic() - began
        self.timings.append((title, took))
        print(f"[{time.monotonic() - self.start:7.1f}s]   ok ({took:.1f}s)", flush=True)

    @staticmethod
    def note(text: str) -> None:
        print(f"            {text}", flush=True)

    def summary(self) -> None:
        print("\nstep timings:")
        for title, took in self.timings:
            print(f"  {took:7.1f}s  {title}")
        print(f"  {time.monotonic() - self.start:7.1f}s  total", flush=True)


# ---------------------------------------------------------------- the scenario


@dataclass
class Smoke:
    compose: Compose
    base_url: str
    steps: Steps
    image: str = ""
    tokens: dict[str, str] = field(default_factory=dict)

    def wait_healthy(self, api_replicas: int, timeout: float = 300) -> dict[str, Container]:
        """Every service up: db, mcp and `api_replicas` api containers healthy, migrate done, lb serving."""
        deadline = time.monotonic() + timeout
        while True:
            containers = self.compose.containers()
            by_service: dict[str, list[Container]] = collections.defaultdict(list)
            for container in containers.values():
                by_service[container.service].append(container)
            for job in by_service["migrate"]:
                check(job.status != "exited" or job.exit_code == 0, f"{job.name} exited {job.exit_code}")
            waiting = [name for name in ("db", "mcp") if [c.health for c in by_service[name]] != ["healthy"]]
            healthy_api = [c for c in running(containers, "api") if c.health == "healthy"]
            if len(healthy_api) != api_replicas:
                waiting.append(f"api ({len(healthy_api)}/{api_replicas} healthy)")
            if [c.status for c in by_service["migrate"]] != ["exited"]:
                waiting.append("migrate")
            if not running(containers, "lb"):
                waiting.append("lb")
            elif not waiting and http("GET", f"{self.base_url}/health/ready", timeout=5).status == 200:
                return containers
            else:
                waiting.append("lb (/health/ready)")
            if time.monotonic() > deadline:
                raise SmokeError(f"not healthy after {timeout:.0f}s, waiting for: {', '.join(waiting)}")
            time.sleep(1)

    def token(self, user: str, via_run: bool = False) -> str:
        """A JWT from `chat-backend token` in the api container (exec), or a one-off `run --rm` container."""
        if via_run:
            out = self.compose("run", "--rm", "-T", "api", "token", "--user", user)
        else:
            out = self.compose("exec", "-T", "api", "chat-backend", "token", "--user", user)
        lines = out.strip().splitlines()
        check(bool(lines) and lines[-1].count(".") == 2, f"`chat-backend token` printed no JWT: {out!r}")
        self.tokens[user] = lines[-1]
        return lines[-1]

    def chat(self, user: str, message: str, **extra: str) -> Reply:
        return http("POST", f"{self.base_url}/api/chat", self.tokens[user], {"message": message, **extra})

    def conversations(self, user: str) -> list[dict[str, Any]]:
        reply = http("GET", f"{self.base_url}/api/conversations?limit=100", self.tokens[user])
        check(reply.status == 200, f"listing conversations: {reply.status} {reply.body}")
        return list(reply.body["data"])

    def messages(self, user: str, conversation_id: str) -> list[dict[str, Any]]:
        """Every message of a conversation, oldest first (following `next_before`)."""
        pages: list[list[dict[str, Any]]] = []
        before = ""
        while True:
            url = f"{self.base_url}/api/conversations/{conversation_id}?limit=200{before}"
            reply = http("GET", url, self.tokens[user])
            check(reply.status == 200, f"reading conversation {conversation_id}: {reply.status} {reply.body}")
            pages.insert(0, reply.body["messages"])
            if not reply.body["next_before"]:
                return [message for page in pages for message in page]
            before = f"&before={reply.body['next_before']}"

    def tasks(self, user: str) -> list[str]:
        """The user's task titles, asked the way a user would (the API never reads the task table)."""
        reply = self.chat(user, "show my tasks")
        check(reply.status == 200, f"show my tasks: {reply.status} {reply.body}")
        (call,) = reply.body["tool_calls"]
        return [str(task["title"]) for task in call["result"]["tasks"]]

    # -------------------------------------------------------------- steps

    def build_and_start(self) -> None:
        with self.steps.step("up --build from a clean state (no containers, no volumes)"):
            self.compose("down", "--volumes", "--remove-orphans")
            began = time.monotonic()
            out = self.compose("--progress", "plain", "up", "--build", "--detach", stderr=True)
            self.steps.note(f"`up --build` returned after {time.monotonic() - began:.1f}s")
            built = sorted(set(re.findall(r"naming to (\S+)", out)))
            names = re.findall(r"naming to \S+", out)
            self.steps.note(f"image builds: {len(names)} ({', '.join(built) or 'none reported'})")
            check(len(names) <= 1, f"the image was built {len(names)} times; build it once")
            containers = self.wait_healthy(api_replicas=1)
            (api,) = running(containers, "api")
            self.image = api.image
            self.steps.note(f"healthy: {', '.join(sorted(c.name for c in containers.values()))}")

    def chat_through_balancer(self) -> None:
        with self.steps.step("chat through the balancer (token from `docker compose exec api chat-backend token`)"):
            self.token("smoke-alice")
            first = self.chat("smoke-alice", "add buy milk", client_message_id="smoke-alice-1")
            check(first.status == 200, f"POST /api/chat: {first.status} {first.body}")
            check([c["name"] for c in first.body["tool_calls"]] == ["add_task"], f"no add_task: {first.body}")
            conversation = first.body["conversation_id"]
            second = self.chat("smoke-alice", "show my tasks", conversation_id=conversation)
            check(second.status == 200 and "buy milk" in second.body["response"], f"show: {second.body}")
            check(len(self.conversations("smoke-alice")) == 1, "alice should have one conversation")
            self.steps.note(f"reply: {second.body['response']!r} (model {second.body['model']})")

    def token_via_run(self) -> None:
        with self.steps.step("`docker compose run --rm api token` recreates nothing"):
            before = self.compose.containers()
            self.token("smoke-bob", via_run=True)
            after = self.compose.containers()
            changed = unchanged(before, after, "`run --rm`")
            check(not changed, "; ".join(changed))
            hello = self.chat("smoke-bob", "hello")
            check(hello.status == 200, f"POST /api/chat with bob's token: {hello.status} {hello.body}")
            check(set(after) == set(before), "`run --rm` left a container behind")
            self.steps.note(f"same {len(after)} containers, none restarted{reran(before, after)}")

    def scale(self, replicas: int) -> None:
        with self.steps.step(f"up --scale api={replicas}: the others keep running, the balancer keeps answering"):
            before = self.compose.containers()
            probe = HealthProbe(f"{self.base_url}/health")
            with probe:
                began = time.monotonic()
                self.compose("up", "--detach", "--scale", f"api={replicas}")
                returned = time.monotonic() - began
                after = self.wait_healthy(api_replicas=replicas)
            changed = unchanged(before, after, "--scale")
            check(not changed, "; ".join(changed))
            new = sorted(c.name for cid, c in after.items() if cid not in before)
            added_api = all(c.service == "api" for c in after.values() if c.name in new)
            check(len(new) == replicas - 1 and added_api, f"scaling added {new}")
            self.steps.note(f"`up --scale` returned after {returned:.1f}s (new replicas healthy)")
            self.steps.note(f"added {', '.join(new)}; nothing else recreated or restarted{reran(before, after)}")
            self.steps.note(f"balancer during scaling: {probe.summary()}")
            check(probe.failures == 0, f"the balancer failed {probe.failures} health checks while scaling")

    def spread(self, replicas: int, requests: int = 30) -> None:
        with self.steps.step(f"{requests} requests spread over the {replicas} replicas"):
            deadline = time.monotonic() + 60  # nginx re-resolves `api` every 10 s
            attempt = 0
            while True:
                attempt += 1
                tag = f"spread-{attempt}-{secrets.token_hex(3)}"
                for _ in range(requests):
                    reply = http(
                        "GET", f"{self.base_url}/api/conversations?limit=1", self.tokens["smoke-alice"], tag=tag
                    )
                    check(reply.status == 200, f"GET through the balancer: {reply.status} {reply.body}")
                counts = self.upstream_counts(tag)
                if len(counts) == replicas or time.monotonic() > deadline:
                    break
                time.sleep(2)
            shown = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
            self.steps.note(f"round {attempt}: {shown}")
            check(len(counts) == replicas, f"requests reached {len(counts)} of {replicas} replicas: {shown}")

    def upstream_counts(self, tag: str) -> collections.Counter[str]:
        """Which replica served the requests tagged `tag`, from nginx's access log (`upstream=ip:port`)."""
        by_ip = {c.ip: c.name for c in running(self.compose.containers(), "api")}
        log = self.compose("logs", "--no-log-prefix", "lb")
        counts: collections.Counter[str] = collections.Counter()
        for line in log.splitlines():
            match = re.search(r"upstream=([\d.]+):\d+", line)
            if tag in line and match:
                counts[by_ip.get(match.group(1), match.group(1))] += 1
        return counts

    def kill_replica_under_load(self, clients: int = 8) -> None:
        with self.steps.step(f"kill one replica while {clients} clients chat; retry failures with their key"):
            user = "smoke-carol"
            self.token(user, via_run=False)
            load = Load(self, user, clients)
            load.start()
            victims: list[str] = []
            try:
                load.wait_for(turns=8 * clients, timeout=60)
                for victim in running(self.compose.containers(), "api")[1:]:
                    # SIGKILL: no graceful drain, the turns running on it just stop.
                    run(["docker", "kill", victim.id])
                    victims.append(victim.name)
                    time.sleep(3)
                    if load.failed_first_attempts():
                        break
                time.sleep(3)
            finally:
                load.stop()
            self.steps.note(f"killed {', '.join(victims)}")
            self.steps.note(load.summary())
            check(load.failed_first_attempts() > 0, "no POST was in flight on a killed replica; nothing was tested")
            codes = collections.Counter(
                f"{body.get('code')} retryable={body.get('retryable')}" if isinstance(body, dict) else "not JSON"
                for body in load.failure_bodies
            )
            self.steps.note(f"failure bodies (other than 409): {dict(codes)}")
            check(
                all(isinstance(body, dict) and body.get("retryable") is True for body in load.failure_bodies),
                f"a failure without a JSON body saying retryable: {load.failure_bodies[:3]}",
            )
            self.verify_turns(user, load.turns)

    def verify_turns(self, user: str, turns: list[Turn]) -> None:
        unanswered = [t.key for t in turns if t.attempts[-1] != 200]
        check(not unanswered, f"never acknowledged after retries: {unanswered} ({[t.attempts for t in turns]})")
        stored: dict[str, list[dict[str, Any]]] = {}
        for conversation in {t.conversation_id for t in turns}:
            stored[conversation] = self.messages(user, conversation)
        for turn in turns:
            messages = stored[turn.conversation_id]
            users = [m for m in messages if m["role"] == "user" and m["client_message_id"] == turn.key]
            check(len(users) == 1, f"{turn.key}: {len(users)} user messages stored ({attempts(turn.attempts)})")
            replies = [m for m in messages if m["reply_to"] == users[0]["id"] and m["status"] == "complete"]
            check(len(replies) == 1, f"{turn.key}: {len(replies)} complete replies ({attempts(turn.attempts)})")
            check(replies[0]["id"] == turn.message_id, f"{turn.key}: acknowledged {turn.message_id}, stored other")
        titles = collections.Counter(self.tasks(user))
        expected = collections.Counter(t.title for t in turns)
        check(titles == expected, f"tasks differ from the acknowledged turns: {titles - expected} {expected - titles}")
        retried = [t for t in turns if len(t.attempts) > 1]
        self.steps.note(
            f"{len(turns)} acknowledged turns all stored once; {len(retried)} retried with the same "
            f"client_message_id and stored once; {sum(titles.values())} tasks, no duplicates"
        )
        for turn in retried:
            self.steps.note(f"  {turn.key}: {attempts(turn.attempts)}, acknowledged after {turn.took:.1f}s")

    def restart_keeps_data(self) -> None:
        with self.steps.step("down, then up: the data is still there"):
            users = sorted(self.tokens)
            before = {user: self.conversations(user) for user in users}
            self.compose("down")
            began = time.monotonic()
            self.compose("up", "--detach")
            self.wait_healthy(api_replicas=1)
            self.steps.note(f"healthy {time.monotonic() - began:.1f}s after `up`")
            for user in users:
                after = self.conversations(user)
                check(_summaries(after) == _summaries(before[user]), f"{user}'s conversations changed across down/up")
            check("buy milk" in self.tasks("smoke-alice"), "alice's task is gone")
            counts = {user: sum(c["message_count"] for c in before[user]) for user in users}
            self.steps.note(f"messages kept: {counts}")

    def rebuild_changes_nothing(self) -> None:
        with self.steps.step("second up --build with no change: nothing recreated or restarted"):
            before = self.compose.containers()
            self.compose("up", "--build", "--detach")
            after = self.wait_healthy(api_replicas=1)
            changed = unchanged(before, after, "a second `up --build`")
            check(not changed, "; ".join(changed))
            check(set(after) == set(before), "`up --build` added containers")
            images = {c.image for c in after.values() if c.service in ("migrate", "mcp", "api")}
            check(images == {self.image}, f"the image changed: {self.image} -> {images}")
            self.steps.note(f"same {len(after)} containers, same image {self.image[7:19]}{reran(before, after)}")


def _summaries(conversations: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(str(c["id"]), int(c["message_count"])) for c in conversations]


class HealthProbe:
    """Polls a URL in the background (e.g. the balancer while the stack is scaled) and counts failures."""

    def __init__(self, url: str, every: float = 0.2) -> None:
        self.url, self.every = url, every
        self.ok = self.failures = 0
        self.statuses: collections.Counter[int] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            status = http("GET", self.url, timeout=5).status
            self.statuses[status] += 1
            if status == 200:
                self.ok += 1
            else:
                self.failures += 1
            self._stop.wait(self.every)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        return f"{self.ok}/{self.ok + self.failures} GET /health answered 200 ({dict(self.statuses)})"


@dataclass
class Turn:
    key: str  # the client_message_id
    title: str
    attempts: list[int] = field(default_factory=list)
    conversation_id: str = ""
    message_id: str = ""
    took: float = 0.0


class Load:
    """Clients each chatting in their own conversation, as a careful client does: every POST carries a
    client_message_id, and a failed one is retried with the same key until it is acknowledged."""

    def __init__(self, smoke: Smoke, user: str, clients: int) -> None:
        self.smoke, self.user = smoke, user
        self.turns: list[Turn] = []
        self.failure_bodies: list[Any] = []  # what a client got instead of an answer
        self.failed_posts = 0  # POSTs that got no 200 on their first attempt, counted as they happen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._run = secrets.token_hex(3)
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait_for(self, turns: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.turns) < turns:
            check(time.monotonic() < deadline, f"only {len(self.turns)} turns in {timeout:.0f}s")
            time.sleep(0.1)

    def failed_first_attempts(self) -> int:
        with self._lock:
            return self.failed_posts

    def _client(self, index: int) -> None:
        conversation = ""
        number = 0
        while not self._stop.is_set():
            number += 1
            title = f"load {self._run} {index}-{number}"
            turn = Turn(key=f"smoke-{self._run}-{index}-{number}", title=title)
            body = {"client_message_id": turn.key}
            if conversation:
                body["conversation_id"] = conversation
            began = time.monotonic()
            while True:
                reply = self.smoke.chat(self.user, f"add {title}", **body)
                turn.attempts.append(reply.status)
                if reply.status == 200:
                    conversation = turn.conversation_id = str(reply.body["conversation_id"])
                    turn.message_id = str(reply.body["message_id"])
                    break
                with self._lock:
                    if len(turn.attempts) == 1:
                        self.failed_posts += 1
                    if reply.status != 409:
                        self.failure_bodies.append(reply.body)
                if reply.status not in RETRYABLE or time.monotonic() - began > RETRY_BUDGET_SECONDS:
                    break
                time.sleep(0.5)
            turn.took = time.monotonic() - began
            with self._lock:
                self.turns.append(turn)
            if turn.attempts[-1] != 200:
                return

    def summary(self) -> str:
        with self._lock:
            first = collections.Counter(t.attempts[0] for t in self.turns)
            later = collections.Counter(s for t in self.turns for s in t.attempts[1:])
        return f"{len(self.turns)} turns; first attempts by status {dict(first)}; retries by status {dict(later)}"


# ---------------------------------------------------------------- entry point


def engine_problem() -> str | None:
    """Why this machine cannot run the smoke test, or None."""
    if not shutil.which("docker"):
        return "no `docker` command on PATH"
    for cmd, what in (
        (["docker", "compose", "version"], "the compose plugin"),
        (["docker", "info"], "a Docker engine"),
    ):
        try:
            subprocess.run(cmd, capture_output=True, check=True, timeout=60)  # noqa: S603 - fixed argv
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return f"`{' '.join(cmd)}` failed: {what} is not available"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", default="chat-backend-smoke", help="compose project name (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="host port for the balancer (default: a free one)")
    parser.add_argument("--replicas", type=int, default=3, help="api replicas to scale to (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running at the end (no down -v)")
    args = parser.parse_args(argv)

    problem = engine_problem()
    if problem:
        print(f"compose smoke test skipped: {problem}", file=sys.stderr)
        return 2
    port = args.port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="compose-smoke-"))
    env_text = make_env((ROOT / ".env.example").read_text(), smoke_settings(port))
    env_file = workdir / ".env"
    env_file.write_text(env_text)
    env_file.chmod(0o600)
    override = workdir / "compose.smoke-env.yml"
    override.write_text(env_file_override(env_file))
    environment = compose_environment(env_text, os.environ, override)
    compose = Compose(args.project, env_file, environment)
    steps = Steps()
    print(f"compose smoke test: project {args.project}, balancer http://127.0.0.1:{port}, env file {env_file}")
    print(f"COMPOSE_FILE={environment['COMPOSE_FILE']}")
    print(
        run(["docker", "compose", "version"]).strip()
        + "; engine "
        + run(["docker", "version", "--format", "{{.Server.Version}}"]).strip()
    )
    smoke = Smoke(compose, f"http://127.0.0.1:{port}", steps)
    failed = False
    try:
        smoke.build_and_start()
        smoke.chat_through_balancer()
        smoke.token_via_run()
        smoke.scale(args.replicas)
        smoke.spread(args.replicas)
        smoke.kill_replica_under_load()
        smoke.restart_keeps_data()
        smoke.rebuild_changes_nothing()
    except SmokeError as exc:
        failed = True
        print(f"\nFAILED: {exc}", flush=True)
        with contextlib.suppress(SmokeError):
            print(compose("ps", "--all"))
            print(compose("logs", "--tail", "30"))
    finally:
        if args.keep:
            print(f"left running: COMPOSE_FILE={environment['COMPOSE_FILE']} docker compose -p {args.project} ...")
        else:
            with steps.step(f"clean up: down --volumes of project {args.project}"):
                compose("down", "--volumes", "--remove-orphans")
            shutil.rmtree(workdir, ignore_errors=True)
    steps.summary()
    print("FAILED" if failed else "PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
