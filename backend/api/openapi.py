"""What the OpenAPI document needs beyond what FastAPI infers from the routes.

`/chatkit` reads its raw body (ChatKit's own parser decides what it is) and both streaming routes
answer Server-Sent Events, so FastAPI sees neither their request nor their events. Routes name
those schemas with `schema_ref`; `install` adds them (and the `servers` list) to the generated
document, so generators (openapi-typescript, openapi-generator) give real types, not `{}`.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from chatkit.types import ChatKitReq, ThreadStreamEvent
from fastapi import FastAPI
from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode, PydanticJsonSchemaWarning

from backend.api.stream_events import ChatStreamEvent

# Component name -> (type, JSON-schema mode): requests are read (validation), events written.
SCHEMAS: dict[str, tuple[Any, JsonSchemaMode]] = {
    "ChatKitRequest": (ChatKitReq, "validation"),
    "ChatKitEvent": (ThreadStreamEvent, "serialization"),
    "ChatStreamEvent": (ChatStreamEvent, "serialization"),
}

REF = "#/components/schemas/{model}"

SSE_NOTE = (
    "Server-Sent Events: each event is one `data:` line holding one JSON value of this schema "
    "(unnamed events, so `EventSource.onmessage` sees them all)."
)


def schema_ref(name: str) -> dict[str, str]:
    if name not in SCHEMAS:
        raise KeyError(f"no OpenAPI schema named {name}")
    return {"$ref": REF.format(model=name)}


def event_stream(name: str, description: str) -> dict[str, Any]:
    """A `text/event-stream` media type whose events are `name`."""
    return {"schema": {**schema_ref(name), "description": f"{description} {SSE_NOTE}"}}


def extra_schemas() -> dict[str, Any]:
    """SCHEMAS as OpenAPI components, with every model they refer to."""
    inputs = [(name, mode, TypeAdapter(kind)) for name, (kind, mode) in SCHEMAS.items()]
    with warnings.catch_warnings():
        # A ChatKit generic's TypeVar default cannot be rendered; the schema is right without it.
        warnings.simplefilter("ignore", PydanticJsonSchemaWarning)
        top, defs = TypeAdapter.json_schemas(inputs, ref_template=REF)
    schemas = {**defs.get("$defs", {}), **{name: top[(name, mode)] for name, (_, mode) in SCHEMAS.items()}}
    # pydantic names a generic model after its whole type (`Page_Annotated_Union_...`): one short name.
    text = json.dumps(schemas)
    for name in [n for n in schemas if n.startswith("Page_Annotated_Union_UserMessageItem")]:
        text = text.replace(f'"{REF.format(model=name)}"', f'"{REF.format(model="ThreadItemPage")}"')
        text = text.replace(f'"{name}"', '"ThreadItemPage"')
    renamed: dict[str, Any] = json.loads(text)
    _tidy(renamed)
    return renamed


def _errors_are_json(document: dict[str, Any]) -> None:
    """FastAPI files `responses` models under the route's media type; an SSE route's errors are
    still JSON bodies, answered before any event."""
    error_ref = REF.format(model="ErrorBody")
    for operations in document["paths"].values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if any(media.get("schema", {}).get("$ref") == error_ref for media in content.values()):
                    response["content"] = {"application/json": {"schema": {"$ref": error_ref}}}


def _tidy(schemas: dict[str, Any]) -> None:
    """Say what pydantic leaves implicit, so linters and generators read the schemas right.

    A discriminated union cannot pick a member without its tag, even where the member's own tag
    field has a default: mark it required, or the members overlap. And `Any | None` is any value:
    drop its `anyOf: [{}, {"type": "null"}]`, whose empty branch already matches everything.
    """
    tags: list[tuple[str, str]] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if {} in node.get("anyOf", []):
                del node["anyOf"]
            discriminator = node.get("discriminator")
            if isinstance(discriminator, dict) and {"propertyName", "mapping"} <= discriminator.keys():
                tag = discriminator["propertyName"]
                tags.extend((ref.rsplit("/", 1)[-1], tag) for ref in discriminator["mapping"].values())
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schemas)
    for name, tag in tags:
        required = schemas[name].setdefault("required", [])
        if tag not in required:
            required.append(tag)


def install(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        document["servers"] = [{"url": "/", "description": "This server (relative to where the document is served)"}]
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in extra_schemas().items():
            # The same model reached two ways is fine (FastAPI's rendering kept); two models under one name are not.
            existing = schemas.setdefault(name, schema)
            if set(existing.get("properties", {})) != set(schema.get("properties", {})):
                raise RuntimeError(f"OpenAPI component {name} is defined twice, differently")
        _errors_are_json(document)
        return document

    app.openapi = openapi  # type: ignore[method-assign]
