"""Per-user limits on what costs money: turn starts per minute, model tokens per UTC day, turns at once.

Enforced in PostgreSQL so every replica shares them, inside the transaction that begins a turn and
before the user's message is stored: the user's `user_quota` row is locked first, so two turn starts
of one user are counted one after the other (atomic under concurrency), and a refused start stores
nothing. Turn starts use GCRA (one timestamp per user: the theoretical arrival time of the next
allowed start), which allows a burst of N and then one start every 60/N seconds. Tokens are added
to the user's day when a reply is stored, whatever its outcome (turn_store's finish statement).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, text

from backend.failures import LimitExceeded

WINDOW = timedelta(minutes=1)


@dataclass(frozen=True)
class Limits:
    turns_per_minute: int = 0
    tokens_per_day: int = 0
    concurrent_turns: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.turns_per_minute or self.tokens_per_day or self.concurrent_turns)


_LOCK = text(
    """
    INSERT INTO user_quota AS q (user_id, turn_tat, tokens_day, tokens_used)
    VALUES (:user, now(), (now() AT TIME ZONE 'UTC')::date, 0)
    ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id
    RETURNING q.turn_tat, q.tokens_day, q.tokens_used, now() AS now, (now() AT TIME ZONE 'UTC')::date AS today
    """
)
_TAKE = text("UPDATE user_quota SET turn_tat = :tat WHERE user_id = :user")
_RUNNING = text(
    "SELECT count(*) FROM conversation"
    " WHERE user_id = :user AND turn_id IS NOT NULL AND turn_lease_until > now() AND id <> :conversation"
)


def take_turn(connection: Connection, user_id: str, conversation_id: uuid.UUID, limits: Limits) -> None:
    """Count one turn start for the user, or raise `LimitExceeded` (nothing counted)."""
    if not limits.enabled:
        return
    row = connection.execute(_LOCK, {"user": user_id}).one()
    now: datetime = row.now
    if limits.tokens_per_day:
        used = row.tokens_used if row.tokens_day == row.today else 0
        if used >= limits.tokens_per_day:
            midnight = datetime.combine(row.today + timedelta(days=1), datetime.min.time(), now.tzinfo)
            raise LimitExceeded(
                "You have used today's model tokens; try again tomorrow (UTC)",
                code="quota_exceeded",
                retry_after=(midnight - now).total_seconds(),
                policy=("tokens", limits.tokens_per_day, 86400),
            )
    if limits.concurrent_turns:
        running = connection.execute(_RUNNING, {"user": user_id, "conversation": conversation_id}).scalar_one()
        if running >= limits.concurrent_turns:
            raise LimitExceeded(
                "Too many replies are being generated for you at once; try again shortly", retry_after=2
            )
    if limits.turns_per_minute:
        tat = max(row.turn_tat, now) + WINDOW / limits.turns_per_minute
        if tat - now > WINDOW:
            raise LimitExceeded(
                "Too many messages in a short time; slow down",
                retry_after=(tat - WINDOW - now).total_seconds(),
                policy=("turns", limits.turns_per_minute, int(WINDOW.total_seconds())),
            )
        connection.execute(_TAKE, {"tat": tat, "user": user_id})
