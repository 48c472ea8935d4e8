"""Tools as clients and models should see them: closed schemas, tidy text, plain argument errors.

The SDK's `Tool.from_function` leaves three rough edges that this module files off:
- its argument model ignores unknown arguments, so `{"user_id": "alice"}` was silently dropped;
  here the model forbids them (`additionalProperties: false` in the schema, and an error the model
  can read: "unexpected argument user_id");
- a docstring becomes the description verbatim, indentation included; here it is `cleandoc`-ed;
- a validation failure reaches the model as pydantic's text, with its documentation URL and
  version; here it is one plain sentence per argument ("title must be 1-200 characters").
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp_types import ToolAnnotations
from pydantic import ConfigDict, ValidationError

from backend import metrics

log = logging.getLogger(__name__)


class StrictTool(Tool):
    """A tool whose argument errors are plain sentences, built from `rules` (argument -> rule)."""

    rules: dict[str, str] = {}

    async def run(self, arguments: dict[str, Any], context: Context[Any, Any], convert_result: bool = False) -> Any:
        started, outcome = time.monotonic(), "error"
        try:
            result = await super().run(arguments, context, convert_result)
            outcome = "ok"
            return result
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(exc, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            outcome = "invalid_arguments"
            # The cause stays attached: the SDK logs the rejected field names (never the values).
            raise ToolError(f"Error executing tool {self.name}: {plain_errors(cause, self.rules)}") from cause
        finally:
            # One line per call, never its arguments (task titles are the user's text); the request id
            # on it is the API's, so a turn's calls are found from the API's log line.
            duration_ms = int((time.monotonic() - started) * 1000)
            metrics.mcp_tool_served(self.name, outcome)
            log.info(
                "tool %s outcome=%s duration_ms=%d",
                self.name,
                outcome,
                duration_ms,
                extra={"tool": self.name, "outcome": outcome, "duration_ms": duration_ms},
            )


def plain_errors(error: ValidationError, rules: Mapping[str, str]) -> str:
    """One sentence per offending argument, in the order pydantic reports them."""
    sentences: dict[str, str] = {}
    for item in error.errors(include_url=False, include_input=False):
        name = str(item["loc"][0]) if item["loc"] else "arguments"
        if name in sentences:
            continue
        if item["type"] == "extra_forbidden":
            sentences[name] = f"unexpected argument {name}"
        elif item["type"] == "missing":
            sentences[name] = f"{name} is required"
        elif item["type"] == "value_error":  # our own validators speak plainly: "must not contain NUL ..."
            sentences[name] = f"{name} {str(item['msg']).removeprefix('Value error, ')}"
        elif name in rules:
            sentences[name] = f"{name} {rules[name]}"
        else:
            sentences[name] = f"{name} is not valid"
    return "; ".join(sentences.values())


def strict_tool(
    fn: Callable[..., Any], *, title: str, annotations: ToolAnnotations, rules: Mapping[str, str]
) -> StrictTool:
    """`fn` as a tool with a top-level title, a dedented description and a closed input schema."""
    description = inspect.cleandoc(fn.__doc__ or "")
    tool = cast(StrictTool, StrictTool.from_function(fn, title=title, description=description, annotations=annotations))
    loose = tool.fn_metadata.arg_model
    namespace = {"model_config": ConfigDict(extra="forbid"), "__module__": loose.__module__}
    closed = cast(type[ArgModelBase], type(loose.__name__, (loose,), namespace))
    return tool.model_copy(
        update={
            "fn_metadata": tool.fn_metadata.model_copy(update={"arg_model": closed}),
            "parameters": closed.model_json_schema(by_alias=True),
            "rules": dict(rules),
        }
    )
