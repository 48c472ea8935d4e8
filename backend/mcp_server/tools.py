"""The five task tools. The user always comes from the verified bearer token, never from arguments.

Every statement carries `user_id = :uid` next to the id, so another user's task and a missing one are
indistinguishable ("task N not found"). Arguments are validated by pydantic before a tool body runs;
a failure reaches the model as an `is_error` result it can read and correct.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

import anyio.to_thread
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import AfterValidator, BaseModel, Field, StringConstraints
from sqlalchemy import Engine, delete, func, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlmodel import Session, col, select

from backend.db import session_scope
from backend.delegation import CALL_META
from backend.mcp_server.auth import current_user_id
from backend.models import Task, ToolCall, no_nul

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


def add_task_db(session: Session, user_id: str, title: str, description: str | None) -> TaskChange:
    task = Task(user_id=user_id, title=title, description=description or None)
    session.add(task)
    session.flush()
    assert task.id is not None
    return TaskChange(task_id=task.id, status="created", title=task.title)


def list_tasks_db(session: Session, user_id: str, status: str) -> TaskList:
    query = select(Task).where(col(Task.user_id) == user_id)
    if status != "all":
        query = query.where(col(Task.completed) == (status == "completed"))
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


def _change(session: Session, task_id: int, statement: Any, status: ChangeStatus) -> TaskChange:
    """Run one owner-scoped UPDATE/DELETE ... RETURNING id, title."""
    row = session.exec(statement).first()
    if row is None:
        raise _not_found(task_id)
    return TaskChange(task_id=row.id, status=status, title=row.title)


def _owned(task_id: int, user_id: str) -> tuple[Any, Any]:
    return col(Task.id) == task_id, col(Task.user_id) == user_id


def complete_task_db(session: Session, user_id: str, task_id: int) -> TaskChange:
    stmt = (
        update(Task)
        .where(*_owned(task_id, user_id))
        .values(completed=True, updated_at=func.now())
        .returning(col(Task.id), col(Task.title))
    )
    return _change(session, task_id, stmt, "completed")


def update_task_db(
    session: Session, user_id: str, task_id: int, title: str | None, description: str | None
) -> TaskChange:
    values: dict[str, Any] = {"updated_at": func.now()}
    if title is not None:
        values["title"] = title
    if description is not None:
        values["description"] = description or None  # "" clears the description
    stmt = update(Task).where(*_owned(task_id, user_id)).values(**values).returning(col(Task.id), col(Task.title))
    return _change(session, task_id, stmt, "updated")


def delete_task_db(session: Session, user_id: str, task_id: int) -> TaskChange:
    stmt = delete(Task).where(*_owned(task_id, user_id)).returning(col(Task.id), col(Task.title))
    return _change(session, task_id, stmt, "deleted")


_T = TypeVar("_T")


def replay_key(user_id: str, tool: str, arguments: dict[str, Any], ctx: Context[Any]) -> str | None:
    """Who, which turn, which call: the same for a re-run of a turn that makes the same call again.

    The turn comes from the verified delegation token, the call's position among identical calls in
    the run from the API's `_meta`; the tool name and arguments are hashed in here, so no client can
    make one call answer for another.
    """
    token = get_access_token()
    turn = (token.claims or {}).get("turn") if token else None
    occurrence = (ctx.request_context.meta or {}).get(CALL_META)
    if not isinstance(turn, str) or not isinstance(occurrence, int):
        return None
    material = json.dumps([user_id, turn, tool, arguments, occurrence], sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()


def _once(
    engine: Engine, user_id: str, tool: str, key: str | None, work: Callable[[Session], TaskChange]
) -> TaskChange:
    """`work` in one transaction, recorded under `key`; a recorded key answers its first result."""
    try:
        with session_scope(engine) as session:
            if key is not None and (done := session.get(ToolCall, key)) is not None:
                return TaskChange.model_validate(done.result)
            result = work(session)
            if key is not None:
                session.add(ToolCall(key=key, user_id=user_id, tool=tool, result=result.model_dump()))
            return result
    except IntegrityError:
        # The same call raced itself (the turn lease makes this all but impossible): the first one won.
        with session_scope(engine) as session:
            done = session.get(ToolCall, key)
            if done is None:
                raise
            return TaskChange.model_validate(done.result)


# A turn is re-run within minutes of its failure; its recorded calls are not needed for longer.
TOOL_CALL_RETENTION = timedelta(days=2)


def purge_tool_calls(engine: Engine, older_than: timedelta = TOOL_CALL_RETENTION) -> int:
    with session_scope(engine) as session:
        result = session.execute(delete(ToolCall).where(col(ToolCall.created_at) < func.now() - older_than))
        return int(getattr(result, "rowcount", 0))


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """psycopg2 blocks: keep it off the event loop; an unreachable database becomes a tool error."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except (OperationalError, InterfaceError) as exc:
        raise ToolError("the task database is unavailable; try again shortly") from exc


def _read(engine: Engine, work: Callable[[Session], _T]) -> _T:
    with session_scope(engine) as session:
        return work(session)


# --- tool registration --------------------------------------------------------------------------------


def register_tools(server: MCPServer[Any], engine: Engine) -> None:
    async def change(
        ctx: Context[Any], tool: str, arguments: dict[str, Any], work: Callable[[Session, str], TaskChange]
    ) -> TaskChange:
        """A task-changing call for the token's user, done at most once per turn and call."""
        user = current_user_id()
        key = replay_key(user, tool, arguments, ctx)
        return await _in_thread(_once, engine, user, tool, key, lambda session: work(session, user))

    @server.tool(annotations=ToolAnnotations(title="Add task", read_only_hint=False, destructive_hint=False))
    async def add_task(
        ctx: Context[Any],
        title: Annotated[TitleText, Field(description="Short task title, 1-200 characters.")],
        description: Annotated[
            DescriptionText | None, Field(description="Optional longer details, up to 1000 characters.")
        ] = None,
    ) -> TaskChange:
        """Create a new task on the user's to-do list.

        Use when the user asks to add, create, note or remember something to do. Returns the new task's id.
        """
        arguments = {"title": title, "description": description}
        return await change(ctx, "add_task", arguments, lambda s, user: add_task_db(s, user, title, description))

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
        user = current_user_id()
        return await _in_thread(_read, engine, lambda s: list_tasks_db(s, user, status))

    @server.tool(annotations=ToolAnnotations(title="Complete task", read_only_hint=False, idempotent_hint=True))
    async def complete_task(task_id: TaskId, ctx: Context[Any]) -> TaskChange:
        """Mark one of the user's tasks as done, by id. Use list_tasks first if you only know its title."""
        return await change(
            ctx, "complete_task", {"task_id": task_id}, lambda s, user: complete_task_db(s, user, task_id)
        )

    @server.tool(annotations=ToolAnnotations(title="Update task", read_only_hint=False, destructive_hint=False))
    async def update_task(
        ctx: Context[Any],
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
        arguments = {"task_id": task_id, "title": title, "description": description}
        return await change(
            ctx, "update_task", arguments, lambda s, user: update_task_db(s, user, task_id, title, description)
        )

    @server.tool(annotations=ToolAnnotations(title="Delete task", read_only_hint=False, destructive_hint=True))
    async def delete_task(task_id: TaskId, ctx: Context[Any]) -> TaskChange:
        """Permanently delete one of the user's tasks, by id. Only when the user asks to delete/remove it."""
        return await change(ctx, "delete_task", {"task_id": task_id}, lambda s, user: delete_task_db(s, user, task_id))
