"""The task tools' database work: one short transaction per call, always scoped to one user.

Every transaction starts by checking the grant: a turn token is honoured only while its turn holds
the conversation's lease (`check_grant`). Every statement names the user next to the task number,
so another user's task and a missing one are indistinguishable ("task N not found").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel
from sqlalchemy import delete, func, literal, update
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import Session, col, select

from backend.delegation import Delegation
from backend.models import Conversation, Task, TaskCounter, ToolCall

TURN_ENDED = "this conversation turn has ended; the request was not carried out"

ChangeStatus = Literal["created", "completed", "updated", "deleted"]


class TaskChange(BaseModel):
    """The task a tool created or changed."""

    task_id: int
    status: ChangeStatus
    title: str


class TaskItem(BaseModel):
    task_id: int
    title: str
    description: str | None
    completed: bool
    created_at: datetime


class TaskList(BaseModel):
    """The user's tasks, by task number."""

    tasks: list[TaskItem]


def check_grant(session: Session, grant: Delegation) -> None:
    """Begins every task transaction: a turn token holds only while its turn holds the lease.

    The conversation row is read `FOR SHARE`: the API's lease release (an UPDATE of that row) waits
    for this transaction, and a release already under way makes the check see the released row. So
    every task change made with a turn token commits before its turn ends, never after. The lease is
    compared with the database clock, the one clock every replica shares.
    """
    if not grant.is_operator:
        _granted(session, grant, literal(None))


def _granted(session: Session, grant: Delegation, column: Any) -> Any:
    """`check_grant` for a turn token, selecting `column` (a scalar subquery) in the same round trip."""
    live = session.execute(
        core_select(literal(1), column)
        .where(
            col(Conversation.id) == grant.conversation_id,
            col(Conversation.user_id) == grant.user_id,
            col(Conversation.turn_id) == grant.turn_id,
            col(Conversation.turn_lease_until) > func.now(),
        )
        .with_for_update(read=True, of=Conversation)
    ).first()
    if live is None:
        raise ToolError(TURN_ENDED)
    return live[1]


def _not_found(number: int) -> ToolError:
    return ToolError(f"task {number} not found")


def add_task(session: Session, user_id: str, title: str, description: str | None) -> TaskChange:
    """One statement: bump the user's task counter (its row stays locked until this transaction ends,
    which orders one user's concurrent adds) and insert the task under the new number."""
    bumped = (
        insert(TaskCounter)
        .values(user_id=user_id, last_number=1)
        .on_conflict_do_update(
            index_elements=[col(TaskCounter.user_id)], set_={"last_number": col(TaskCounter.last_number) + 1}
        )
        .returning(col(TaskCounter.last_number))
        .cte("bumped")
    )
    now = func.now()
    values = core_select(
        literal(user_id), bumped.c.last_number, literal(title), literal(description or None), literal(False), now, now
    )
    columns = ["user_id", "number", "title", "description", "completed", "created_at", "updated_at"]
    added = insert(Task).from_select(columns, values).returning(col(Task.number), col(Task.title))
    row = session.execute(added).one()
    return TaskChange(task_id=row.number, status="created", title=row.title)


def list_tasks(session: Session, user_id: str, status: str) -> TaskList:
    query = select(Task).where(col(Task.user_id) == user_id)
    if status != "all":
        query = query.where(col(Task.completed) == (status == "completed"))
    rows = session.exec(query.order_by(col(Task.number))).all()
    return TaskList(
        tasks=[
            TaskItem(
                task_id=row.number,
                title=row.title,
                description=row.description,
                completed=row.completed,
                created_at=row.created_at,
            )
            for row in rows
        ]
    )


def _owned(user_id: str, number: int) -> tuple[Any, Any]:
    return col(Task.user_id) == user_id, col(Task.number) == number


def _change(session: Session, number: int, statement: Any, status: ChangeStatus) -> TaskChange:
    """Run one owner-scoped UPDATE/DELETE ... RETURNING number, title."""
    row = session.exec(statement.returning(col(Task.number), col(Task.title))).first()
    if row is None:
        raise _not_found(number)
    return TaskChange(task_id=row.number, status=status, title=row.title)


def complete_task(session: Session, user_id: str, number: int) -> TaskChange:
    stmt = update(Task).where(*_owned(user_id, number)).values(completed=True, updated_at=func.now())
    return _change(session, number, stmt, "completed")


def update_task(session: Session, user_id: str, number: int, title: str | None, description: str | None) -> TaskChange:
    values: dict[str, Any] = {"updated_at": func.now()}
    if title is not None:
        values["title"] = title
    if description is not None:
        values["description"] = description or None  # "" clears the description
    return _change(session, number, update(Task).where(*_owned(user_id, number)).values(**values), "updated")


def delete_task(session: Session, user_id: str, number: int) -> TaskChange:
    return _change(session, number, delete(Task).where(*_owned(user_id, number)), "deleted")


# --- a re-run turn does not repeat its task changes ------------------------------------------------


def replay_key(grant: Delegation, tool: str, arguments: dict[str, Any], occurrence: object) -> str | None:
    """Who, which turn, which call: the same for a re-run of a turn that makes the same call again.

    The turn's replay scope comes from the verified token, the call's position among identical calls
    in the run from the API's `_meta`; the tool name and arguments are hashed in here, so no client
    can make one call answer for another. Operator tokens name no turn: never deduplicated.
    """
    if grant.replay_scope is None or not isinstance(occurrence, int):
        return None
    material = json.dumps([grant.user_id, grant.replay_scope, tool, arguments, occurrence], sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()


def change_once(
    session: Session, grant: Delegation, tool: str, key: str | None, work: Callable[[Session], TaskChange]
) -> TaskChange:
    """`work` in a granted transaction, recorded under `key`; a recorded key answers its first result.
    Should the same call race itself (the turn lease makes this all but impossible), the loser's
    commit fails on the key: `recorded` in a new transaction then answers the winner's result."""
    if (done := recorded(session, grant, key)) is not None:
        return done
    result = work(session)
    if key is not None:
        record = {"key": key, "user_id": grant.user_id, "tool": tool, "result": result.model_dump()}
        session.execute(insert(ToolCall).values(**record, created_at=func.now()))
    return result


def recorded(session: Session, grant: Delegation, key: str | None) -> TaskChange | None:
    """The grant check and the lookup of `key`'s recorded result, in one round trip."""
    if key is None or grant.is_operator:  # operator tokens name no turn, so they have no key either
        check_grant(session, grant)
        return None
    result = _granted(
        session, grant, core_select(col(ToolCall.result)).where(col(ToolCall.key) == key).scalar_subquery()
    )
    return TaskChange.model_validate(result) if result is not None else None


# A turn is re-run within minutes of its failure; its recorded calls are not needed for longer.
TOOL_CALL_RETENTION = timedelta(days=2)


def purge_tool_calls(session: Session, older_than: timedelta = TOOL_CALL_RETENTION) -> int:
    result = session.execute(delete(ToolCall).where(col(ToolCall.created_at) < func.now() - older_than))
    return int(getattr(result, "rowcount", 0))
