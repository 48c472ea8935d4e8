"""The OpenAPI document, checked by the tools clients use on it: Redocly's linter (recommended rules),
openapi-typescript and tsc over a small TypeScript file (tests/js/openapi/check.ts) that type-checks
a ChatKit request body, a failed turn's error body and the stream events. Plus what the document says
about errors and events, checked against what the server emits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from pydantic import TypeAdapter

from backend import failures
from backend.api.chat import event_body
from backend.api.stream_events import ChatStreamEvent
from backend.errors import ErrorBody, service_error_response
from backend.main import create_app
from backend.request_context import REQUEST_ID
from backend.services.turn_events import Token, ToolCalled, ToolReturned, TurnCompleted, TurnError, TurnStarted
from tests.conftest import make_settings
from tests.support.node import npm_project


@pytest.fixture(scope="module")
def app() -> FastAPI:
    # Building the app and its document connects to nothing.
    return create_app(make_settings("postgresql://postgres@127.0.0.1:5432/unused"))


@pytest.fixture(scope="module")
def document(app: FastAPI) -> dict[str, Any]:
    return app.openapi()


@pytest.fixture(scope="session")
def tools() -> Path:
    return npm_project("openapi")


# No network from the tools: Redocly would send usage telemetry and look for a newer version.
QUIET = {"REDOCLY_TELEMETRY": "off", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true", "REDOCLY_SUPPRESS_NOTIFICATIONS": "true"}


def run(tools: Path, *command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = str(tools / "node_modules" / ".bin" / command[0])
    env = {**os.environ, **QUIET}
    return subprocess.run([binary, *command[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# --- the tools clients run ---------------------------------------------------------------------------------


def test_redocly_lint_finds_no_errors(tools: Path, document: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    lint = run(tools, "redocly", "lint", "openapi.json", "--format=json", "--max-problems=1000", cwd=tmp_path)
    report = json.loads(lint.stdout)
    errors = [(p["ruleId"], p["message"]) for p in report["problems"] if p["severity"] == "error"]
    assert errors == []
    assert report["totals"]["errors"] == 0 and lint.returncode == 0, lint.stderr
    # The known warnings, and no others: the health probes answer no 4xx, the project states no license.
    warnings = sorted((p["ruleId"], p["location"][0]["pointer"]) for p in report["problems"])
    assert warnings == [
        ("info-license", "#/info"),
        ("operation-4xx-response", "#/paths/~1health/get/responses"),
        ("operation-4xx-response", "#/paths/~1health~1ready/get/responses"),
    ], report


def test_generated_typescript_types_check_chatkit_and_error_bodies(
    tools: Path, document: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    # Without the flag openapi-typescript makes every request field with a default required.
    generate = run(
        tools, "openapi-typescript", "openapi.json", "--default-non-nullable=false", "-o", "api.d.ts", cwd=tmp_path
    )
    assert generate.returncode == 0, generate.stderr
    types = (tmp_path / "api.d.ts").read_text()
    assert '"application/json": components["schemas"]["ChatKitRequest"]' in types

    shutil.copy(tools / "check.ts", tmp_path / "check.ts")
    tsc_options = ["--strict", "--target", "es2022", "--module", "esnext", "--moduleResolution", "bundler"]
    check = run(tools, "tsc", "--noEmit", *tsc_options, "check.ts", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr

    # The check can fail: a body ChatKit would refuse does not type-check.
    (tmp_path / "wrong.ts").write_text(
        'import type { components } from "./api";\n'
        'export const x: components["schemas"]["ChatKitRequest"] = { type: "threads.create", params: {} };\n'
    )
    wrong = run(tools, "tsc", "--noEmit", *tsc_options, "wrong.ts", cwd=tmp_path)
    assert wrong.returncode != 0 and "input" in wrong.stdout


# --- what the document says, against what the server does --------------------------------------------------


def test_error_body_declares_what_errors_carry(document: dict[str, Any]) -> None:
    schema = document["components"]["schemas"]["ErrorBody"]
    assert set(schema["properties"]) == {"detail", "code", "retryable", "conversation_id", "message_id", "request_id"}
    assert set(schema["required"]) == {"detail", "code"}

    failed = failures.TurnFailed("The model failed", code="model_error", retryable=True)
    failed.turn = (uuid.uuid4(), uuid.uuid4())
    token = REQUEST_ID.set("req-1")  # as within a request (RequestIdMiddleware)
    try:
        for error in (failed, failures.LimitExceeded("Slow down", retry_after=3), failures.NotFound()):
            body = json.loads(service_error_response(error).body)
            assert set(body) <= set(ErrorBody.model_fields), body
            ErrorBody.model_validate(body)
        assert set(json.loads(service_error_response(failed).body)) == set(ErrorBody.model_fields)
    finally:
        REQUEST_ID.reset(token)


def test_every_route_documents_its_errors_as_error_bodies(document: dict[str, Any]) -> None:
    error_ref = "#/components/schemas/ErrorBody"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = {int(s) for s in operation["responses"] if s != "default"}
            errors = {s for s in statuses if s >= 400}
            if path.startswith("/health"):
                assert operation["security"] == [], path
                continue
            assert operation["security"] == [{"HTTPBearer": []}], path
            assert {401, 422, 500, 503} <= errors, (method, path)
            for status in errors:
                content = operation["responses"][str(status)]["content"]
                assert content == {"application/json": {"schema": {"$ref": error_ref}}}, (method, path, status)
    assert {502, 504, 429} <= {int(s) for s in document["paths"]["/api/chat"]["post"]["responses"]}
    scheme = document["components"]["securitySchemes"]["HTTPBearer"]
    assert (scheme["scheme"], scheme["bearerFormat"]) == ("bearer", "JWT")
    assert document["servers"]


def test_streams_are_documented_with_their_events(document: dict[str, Any]) -> None:
    paths, schemas = document["paths"], document["components"]["schemas"]
    stream = paths["/api/chat/stream"]["post"]["responses"]["200"]["content"]
    assert stream["text/event-stream"]["schema"]["$ref"] == "#/components/schemas/ChatStreamEvent"
    kinds = {ref.rsplit("/", 1)[-1] for ref in schemas["ChatStreamEvent"]["discriminator"]["mapping"].values()}
    assert len(kinds) == 7
    chatkit = paths["/chatkit"]["post"]
    assert chatkit["responses"]["200"]["content"]["text/event-stream"]["schema"]["$ref"].endswith("/ChatKitEvent")
    body = chatkit["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatKitRequest"}
    mapping = schemas["ChatKitRequest"]["discriminator"]["mapping"]
    assert {"threads.create", "threads.add_user_message", "items.list"} <= set(mapping)
    assert "type" in schemas["ThreadsCreateReq"]["required"]


def test_stream_events_fit_their_documented_models() -> None:
    """What api/chat.py writes for each turn event is exactly the documented event model."""
    conversation, message = uuid.uuid4(), uuid.uuid4()
    events = [
        TurnStarted(conversation, message),
        Token("hi", 0),
        ToolCalled("call_1", "add_task", {"title": "milk"}),
        ToolReturned("call_1", "add_task", {"task_id": 1}),
        TurnCompleted(conversation, message, "Added", [{"name": "add_task", "arguments": {}, "result": None}]),
        TurnError(failures.TurnFailed("The model failed"), conversation, message),
    ]
    adapter: TypeAdapter[Any] = TypeAdapter(ChatStreamEvent)
    for event in events:
        body = json.loads(json.dumps(event_body(event), default=str))
        parsed = adapter.validate_python(body)  # extra fields are refused
        assert set(body) == set(type(parsed).model_fields), body
    adapter.validate_json('{"type":"heartbeat"}')
