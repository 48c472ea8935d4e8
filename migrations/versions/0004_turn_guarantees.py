"""turn guarantees: per-user idempotency keys, reply index, stored message counts, per-user quotas

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("conversation", sa.Column("message_count", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE conversation c SET message_count = (SELECT count(*) FROM message m WHERE m.conversation_id = c.id)"
    )

    op.add_column("message", sa.Column("user_id", sa.String(255), nullable=True))
    op.execute("UPDATE message m SET user_id = c.user_id FROM conversation c WHERE c.id = m.conversation_id")
    op.alter_column("message", "user_id", nullable=False)
    op.add_column("message", sa.Column("completed_answers", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE message u SET completed_answers = (SELECT count(*) FROM message a"
        " WHERE a.conversation_id = u.conversation_id AND a.reply_to = u.id AND a.status = 'complete')"
        " WHERE u.role = 'user'"
    )
    op.drop_constraint("uq_message_client_id", "message", type_="unique")
    op.create_unique_constraint("uq_message_user_client_id", "message", ["user_id", "client_message_id"])
    op.create_index(
        "ix_message_reply",
        "message",
        ["conversation_id", "reply_to", "seq"],
        postgresql_where=sa.text("reply_to IS NOT NULL"),
    )

    op.create_index(
        "ix_conversation_user_running", "conversation", ["user_id"], postgresql_where=sa.text("turn_id IS NOT NULL")
    )
    op.create_table(
        "user_quota",
        sa.Column("user_id", sa.String(255), primary_key=True),
        sa.Column("turn_tat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens_day", sa.Date(), nullable=False),
        sa.Column("tokens_used", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("user_quota")
    op.drop_index("ix_conversation_user_running", table_name="conversation")
    op.drop_index("ix_message_reply", table_name="message")
    op.drop_constraint("uq_message_user_client_id", "message", type_="unique")
    op.create_unique_constraint("uq_message_client_id", "message", ["conversation_id", "client_message_id"])
    op.drop_column("message", "completed_answers")
    op.drop_column("message", "user_id")
    op.drop_column("conversation", "message_count")
