"""The five task tools. The user always comes from the verified bearer token, never from arguments.

Tasks are named by the user's own task number (`task_id`: 1, 2, 3, ... per user). Arguments are
validated before a tool body runs; a failure reaches the model as an `is_error` result with a plain
sentence it can read and correct. The database work is in `task_store`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import AfterValidator, Field, StringConstraints
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from backend.db import Database, T
from backend.delegation import CALL_META
from backend.failures import DatabaseUnavailable
from backend.mcp_server import task_store
from backend.mcp_server.auth import current_delegation
from backend.mcp_server.strict_tools import StrictTool, strict_tool
from backend.mcp_server.task_store import TaskChange, TaskList
from backend.models import no_nul

PG_INT_MAX = 2**31 - 1  # task.number is a PostgreSQL integer; larger ones would be a driver error

TitleText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), AfterValidator(no_nul)
]
DescriptionText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000), AfterValidator(no_nul)]
TaskId = Annotated[
    int,
    Field(gt=0, le=PG_INT_MAX, description="The task's number, as shown by add_task or list_tasks (1, 2, 3, ...)."),
]
Status = Literal["all", "pending", "completed"]

# What each argument must be, said plainly: the text a model (and a person) sees for a bad value.
RULES = {
    "task_id": "must be a positive whole number",
    "title": "must be 1-200 characters",
    "description": "must be at most 1000 characters",
    "status": "must be 'all', 'pending' or 'completed'",
}


async def _run(db: Database, work: Callable[[Session], T]) -> T:
    """One transaction off the event loop; an unreachable database becomes a tool error."""
    try:
        return await db.run_orm(work)
    except DatabaseUnavailable as exc:
        raise ToolError("the task database is unavailable; try again shortly") from exc


def task_tools(db: Database) -> list[StrictTool]:
    """The tools, bound to `db`; give them to `MCPServer(tools=...)`."""

    async def change(
        ctx: Context[Any], tool: str, arguments: dict[str, Any], work: Callable[[Session, str], TaskChange]
    ) -> TaskChange:
        """A task-changing call for the token's user, done at most once per turn and call."""
        grant = current_delegation()
        key = task_store.replay_key(grant, tool, arguments, (ctx.request_context.meta or {}).get(CALL_META))
        try:
            return await _run(
                db, lambda s: task_store.change_once(s, grant, tool, key, lambda s: work(s, grant.user_id))
            )
        except IntegrityError:
            if (done := await _run(db, lambda s: task_store.recorded(s, grant, key))) is None:
                raise
            return done

    async def add_task(
        ctx: Context[Any],
        title: Annotated[TitleText, Field(description="Short task title, 1-200 characters.")],
        description: Annotated[
            DescriptionText | None, Field(description="Optional longer details, up to 1000 characters.")
        ] = None,
    ) -> TaskChange:
        """Create a new task on the user's to-do list.

        Use when the user asks to add, create, note or remember something to do.
        Returns the new task's number (task_id): the user's first task is 1.
        """
        arguments = {"title": title, "description": description}
        return await change(
            ctx, "add_task", arguments, lambda s, user: task_store.add_task(s, user, title, description)
        )

    async def list_tasks(
        status: Annotated[
            Status, Field(description="'pending' = not done yet, 'completed' = done, 'all' = both (default).")
        ] = "all",
    ) -> TaskList:
        """List the user's tasks (task_id, title, description, completed, created_at), by task number.

        Use to show the to-do list, or to find a task's number before completing, updating or
        deleting it when the user refers to it by name.
        """
        grant = current_delegation()

        def work(session: Session) -> TaskList:
            task_store.check_grant(session, grant)
            return task_store.list_tasks(session, grant.user_id, status)

        return await _run(db, work)

    async def complete_task(task_id: TaskId, ctx: Context[Any]) -> TaskChange:
        """Mark one of the user's tasks as done, by task number.

        Use list_tasks first if you only know its title.
        """
        return await change(
            ctx, "complete_task", {"task_id": task_id}, lambda s, user: task_store.complete_task(s, user, task_id)
        )

    async def update_task(
        ctx: Context[Any],
        task_id: TaskId,
        title: Annotated[TitleText | None, Field(description="New title, 1-200 characters; omit to keep.")] = None,
        description: Annotated[
            DescriptionText | None,
            Field(description="New description, up to 1000 characters; omit to keep, empty string to clear."),
        ] = None,
    ) -> TaskChange:
        """Change the title and/or description of one of the user's tasks, by task number.

        Give at least one of title or description; fields left out stay unchanged.
        """
        if title is None and description is None:
            raise ToolError("nothing to update: give a new title and/or description")
        arguments = {"task_id": task_id, "title": title, "description": description}
        return await change(
            ctx,
            "update_task",
            arguments,
            lambda s, user: task_store.update_task(s, user, task_id, title, description),
        )

    async def delete_task(task_id: TaskId, ctx: Context[Any]) -> TaskChange:
        """Permanently delete one of the user's tasks, by task number.

        Only when the user asks to delete or remove it. Its number is not given to a later task.
        """
        return await change(
            ctx, "delete_task", {"task_id": task_id}, lambda s, user: task_store.delete_task(s, user, task_id)
        )

    def hints(*, read_only: bool, destructive: bool = False, idempotent: bool = False) -> ToolAnnotations:
        return ToolAnnotations(
            read_only_hint=read_only, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=False
        )

    return [
        strict_tool(add_task, title="Add task", annotations=hints(read_only=False), rules=RULES),
        strict_tool(list_tasks, title="List tasks", annotations=hints(read_only=True), rules=RULES),
        strict_tool(
            complete_task, title="Complete task", annotations=hints(read_only=False, idempotent=True), rules=RULES
        ),
        strict_tool(update_task, title="Update task", annotations=hints(read_only=False), rules=RULES),
        strict_tool(
            delete_task, title="Delete task", annotations=hints(read_only=False, destructive=True), rules=RULES
        ),
    ]
