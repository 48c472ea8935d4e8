"""The five task tools. The user always comes from the verified bearer token, never from arguments.

Every statement carries `user_id = :uid` next to the id, so another user's task and a missing one are
indistinguishable ("task N not found"). Arguments are validated by pydantic before a tool body runs;
a failure reaches the model as an `is_error` result it can read and correct.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import AfterValidator, BaseModel, Field, StringConstraints
from sqlalchemy import Engine, delete, func, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import col, select

from backend.db import session_scope
from backend.mcp_server.auth import current_user_id
from backend.models import Task, no_nul

PG_INT_MAX = 2**31 - 1  # task.id is a PostgreSQL integer; larger ids would be a driver error, not "not found"


TitleText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), AfterValidator(no_nul)
]
DescriptionText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000), AfterValidator(no_nul)]
TaskId = Annotated[
    int,
    Field(gt=0, le=PG_INT_MAX, description="The task's numeric id, as returned by add_task or list_tasks."),
]


ChangeStatus = Literal["created", "completed", "updated", "deleted"]


class TaskChange(BaseModel):
    """The task a tool created or changed."""

    task_id: int
    status: ChangeStatus
    title: str


class TaskItem(BaseModel):
    id: int
    title: str
    description: str | None
    completed: bool
    created_at: datetime


class TaskList(BaseModel):
    """The user's tasks, oldest first."""

    tasks: list[TaskItem]


# --- database work (sync, run on a worker thread) ------------------------------------------------------


def _not_found(task_id: int) -> ToolError:
    return ToolError(f"task {task_id} not found")


def add_task_db(engine: Engine, user_id: str, title: str, description: str | None) -> TaskChange:
    with session_scope(engine) as session:
        task = Task(user_id=user_id, title=title, description=description or None)
        session.add(task)
        session.flush()
        assert task.id is not None
        return TaskChange(task_id=task.id, status="created", title=task.title)


def list_tasks_db(engine: Engine, user_id: str, status: str) -> TaskList:
    query = select(Task).where(col(Task.user_id) == user_id)
    if status != "all":
        query = query.where(col(Task.completed) == (status == "completed"))
    with session_scope(engine) as session:
        rows = session.exec(query.order_by(col(Task.id))).all()
        return TaskList(
            tasks=[
                TaskItem(
                    id=row.id or 0,
                    title=row.title,
                    description=row.description,
                    completed=row.completed,
                    created_at=row.created_at,
                )
                for row in rows
            ]
        )


def _change(engine: Engine, task_id: int, statement: Any, status: ChangeStatus) -> TaskChange:
    """Run one owner-scoped UPDATE/DELETE ... RETURNING id, title."""
    with session_scope(engine) as session:
        row = session.exec(statement).first()
    if row is None:
        raise _not_found(task_id)
    return TaskChange(task_id=row.id, status=status, title=row.title)


def _owned(task_id: int, user_id: str) -> tuple[Any, Any]:
    return col(Task.id) == task_id, col(Task.user_id) == user_id


def complete_task_db(engine: Engine, user_id: str, task_id: int) -> TaskChange:
    stmt = (
        update(Task)
        .where(*_owned(task_id, user_id))
        .values(completed=True, updated_at=func.now())
        .returning(col(Task.id), col(Task.title))
    )
    return _change(engine, task_id, stmt, "completed")


def update_task_db(
    engine: Engine, user_id: str, task_id: int, title: str | None, description: str | None
) -> TaskChange:
    values: dict[str, Any] = {"updated_at": func.now()}
    if title is not None:
        values["title"] = title
    if description is not None:
        values["description"] = description or None  # "" clears the description
    stmt = update(Task).where(*_owned(task_id, user_id)).values(**values).returning(col(Task.id), col(Task.title))
    return _change(engine, task_id, stmt, "updated")


def delete_task_db(engine: Engine, user_id: str, task_id: int) -> TaskChange:
    stmt = delete(Task).where(*_owned(task_id, user_id)).returning(col(Task.id), col(Task.title))
    return _change(engine, task_id, stmt, "deleted")


_T = TypeVar("_T")


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """psycopg2 blocks: keep it off the event loop; an unreachable database becomes a tool error."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except (OperationalError, InterfaceError) as exc:
        raise ToolError("the task database is unavailable; try again shortly") from exc


# --- tool registration --------------------------------------------------------------------------------


def register_tools(server: MCPServer[Any], engine: Engine) -> None:
    @server.tool(annotations=ToolAnnotations(title="Add task", read_only_hint=False, destructive_hint=False))
    async def add_task(
        title: Annotated[TitleText, Field(description="Short task title, 1-200 characters.")],
        description: Annotated[
            DescriptionText | None, Field(description="Optional longer details, up to 1000 characters.")
        ] = None,
    ) -> TaskChange:
        """Create a new task on the user's to-do list.

        Use when the user asks to add, create, note or remember something to do. Returns the new task's id.
        """
        return await _in_thread(add_task_db, engine, current_user_id(), title, description)

    @server.tool(annotations=ToolAnnotations(title="List tasks", read_only_hint=True))
    async def list_tasks(
        status: Annotated[
            Literal["all", "pending", "completed"],
            Field(description="'pending' = not done yet, 'completed' = done, 'all' = both (default)."),
        ] = "all",
    ) -> TaskList:
        """List the user's tasks (id, title, description, completed, created_at), oldest first.

        Use to show the to-do list, or to find a task's id before completing, updating or deleting it
        when the user refers to it by name.
        """
        return await _in_thread(list_tasks_db, engine, current_user_id(), status)

    @server.tool(annotations=ToolAnnotations(title="Complete task", read_only_hint=False, idempotent_hint=True))
    async def complete_task(task_id: TaskId) -> TaskChange:
        """Mark one of the user's tasks as done, by id. Use list_tasks first if you only know its title."""
        return await _in_thread(complete_task_db, engine, current_user_id(), task_id)

    @server.tool(annotations=ToolAnnotations(title="Update task", read_only_hint=False, destructive_hint=False))
    async def update_task(
        task_id: TaskId,
        title: Annotated[TitleText | None, Field(description="New title, 1-200 characters; omit to keep.")] = None,
        description: Annotated[
            DescriptionText | None,
            Field(description="New description, up to 1000 characters; omit to keep, empty string to clear."),
        ] = None,
    ) -> TaskChange:
        """Change the title and/or description of one of the user's tasks, by id.

        Give at least one of title or description; fields left out stay unchanged.
        """
        if title is None and description is None:
            raise ToolError("nothing to update: give a new title and/or description")
        return await _in_thread(update_task_db, engine, current_user_id(), task_id, title, description)

    @server.tool(annotations=ToolAnnotations(title="Delete task", read_only_hint=False, destructive_hint=True))
    async def delete_task(task_id: TaskId) -> TaskChange:
        """Permanently delete one of the user's tasks, by id. Only when the user asks to delete/remove it."""
        return await _in_thread(delete_task_db, engine, current_user_id(), task_id)
