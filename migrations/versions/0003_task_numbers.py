"""per-user task numbers: task.number (unique per user) and the task_counter that hands them out

Existing tasks are numbered 1, 2, 3, ... per user in id order, and each user's counter starts
after their highest number.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_counter",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("last_number", sa.Integer(), nullable=False),
    )
    op.add_column("task", sa.Column("number", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE task SET number = numbered.n FROM "
        "(SELECT id, row_number() OVER (PARTITION BY user_id ORDER BY id) AS n FROM task) AS numbered "
        "WHERE task.id = numbered.id"
    )
    op.execute("INSERT INTO task_counter (user_id, last_number) SELECT user_id, max(number) FROM task GROUP BY user_id")
    op.alter_column("task", "number", nullable=False)
    op.create_unique_constraint("uq_task_user_number", "task", ["user_id", "number"])
    # The unique (user_id, number) index serves every per-user query now.
    op.drop_index("ix_task_user_id", table_name="task")


def downgrade() -> None:
    op.create_index("ix_task_user_id", "task", ["user_id", "id"])
    op.drop_constraint("uq_task_user_number", "task", type_="unique")
    op.drop_column("task", "number")
    op.drop_table("task_counter")
