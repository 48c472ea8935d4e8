"""The schema comes from migrations only; they go down and up cleanly and match the models."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import backend.models  # noqa: F401
from backend.cli import alembic_config


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_match_migrations(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_and_upgrade_again(database_url: str) -> None:
    cfg = alembic_config(database_url)
    tables = {"conversation", "message", "task", "task_counter", "tool_call", "user_quota", "alembic_version"}
    assert _tables(database_url) == tables
    command.downgrade(cfg, "0003")
    assert _tables(database_url) == tables - {"user_quota"}
    command.downgrade(cfg, "0002")
    assert _tables(database_url) == tables - {"user_quota", "task_counter"}
    command.downgrade(cfg, "0001")
    assert _tables(database_url) == tables - {"tool_call", "task_counter", "user_quota"}
    command.downgrade(cfg, "base")
    assert _tables(database_url) == {"alembic_version"}
    command.upgrade(cfg, "head")
    assert _tables(database_url) == tables


def test_indexes_and_cascade(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    insp = sa.inspect(engine)
    conv_indexes = {ix["name"]: ix for ix in insp.get_indexes("conversation")}
    assert conv_indexes["ix_conversation_user_updated"]["column_names"][0] == "user_id"
    uniques = {uc["name"]: uc["column_names"] for uc in insp.get_unique_constraints("message")}
    assert uniques["uq_message_conversation_seq"] == ["conversation_id", "seq"]
    assert uniques["uq_message_user_client_id"] == ["user_id", "client_message_id"]
    (fk,) = insp.get_foreign_keys("message")
    assert fk["options"].get("ondelete") == "CASCADE"
    engine.dispose()


def test_0003_numbers_existing_tasks_per_user(database_url: str) -> None:
    """Tasks made before per-user numbers get 1, 2, 3, ... per user in id order; counters follow."""
    cfg = alembic_config(database_url)
    command.downgrade(cfg, "0002")
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            for user, title in [("alice", "a1"), ("bob", "b1"), ("alice", "a2"), ("alice", "a3"), ("bob", "b2")]:
                conn.execute(sa.text("INSERT INTO task (user_id, title) VALUES (:u, :t)"), {"u": user, "t": title})
        command.upgrade(cfg, "0003")
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT user_id, number, title FROM task ORDER BY user_id, number")).all()
            counters = dict(conn.execute(sa.text("SELECT user_id, last_number FROM task_counter")).all())
        assert [tuple(r) for r in rows] == [
            ("alice", 1, "a1"),
            ("alice", 2, "a2"),
            ("alice", 3, "a3"),
            ("bob", 1, "b1"),
            ("bob", 2, "b2"),
        ]
        assert counters == {"alice": 3, "bob": 2}
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:  # unique per user
            conn.execute(sa.text("INSERT INTO task (user_id, number, title) VALUES ('alice', 2, 'dup')"))
        command.downgrade(cfg, "0002")  # and back down with data in it
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM task")).scalar_one() == 5
        command.upgrade(cfg, "head")
    finally:
        engine.dispose()
