"""What can go wrong, independent of how a front door shows it.

Services raise these; `errors.py` renders them as HTTP answers and the ChatKit and stream adapters
render them as events. One type per kind of failure, each with the contract's `code`, a message
written for end users (never upstream text), whether retrying can help, and for limits and
unavailable dependencies how long to wait.
"""

from __future__ import annotations

import uuid


class ServiceError(Exception):
    code: str = "internal_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        field: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.retry_after = retry_after
        # For input errors: where the bad value was (("query", "cursor"), ("body", "after")).
        self.field = field
        # For a failed turn: (conversation_id, message_id) of the stored reply, so a client can retry.
        self.turn: tuple[uuid.UUID, uuid.UUID] | None = None


class Unauthorized(ServiceError):
    code = "unauthorized"


class NotFound(ServiceError):
    code = "not_found"

    def __init__(self, what: str = "Conversation") -> None:
        super().__init__(f"{what} not found")


class ConversationBusy(ServiceError):
    code = "conversation_busy"
    retryable = True

    def __init__(self, message: str = "A reply is already being generated in this conversation") -> None:
        super().__init__(message)


class RetrySuperseded(ServiceError):
    """A retried message that newer messages already follow: re-answering it would reorder history."""

    code = "retry_superseded"

    def __init__(self) -> None:
        super().__init__("Newer messages follow this one in the conversation; send it again as a new message")


class InvalidInput(ServiceError):
    """A value only the service can judge (a cursor, a reused idempotency key): answered 422."""

    code = "validation_error"


class UnsupportedRequest(ServiceError):
    """A well-formed request this server does not offer (attachments, client tools): answered 400."""

    code = "unsupported_request"


class LimitExceeded(ServiceError):
    """A per-user limit: `rate_limited` or `quota_exceeded`, with `retry_after` seconds."""

    code = "rate_limited"
    retryable = True

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: float, policy: tuple[str, int, int] | None = None
    ) -> None:
        super().__init__(message, code=code, retry_after=retry_after)
        # The limit as the IETF httpapi RateLimit headers name it: (name, quota, window seconds).
        self.policy = policy


class Unavailable(ServiceError):
    """A dependency is down: `database_unavailable`, `mcp_unavailable` or `auth_unavailable`."""

    retryable = True


class DatabaseUnavailable(Unavailable):
    code = "database_unavailable"

    def __init__(self) -> None:
        super().__init__("The database is unavailable; try again shortly", retry_after=2)


class McpUnavailable(Unavailable):
    code = "mcp_unavailable"

    def __init__(self, message: str = "The task service is unavailable; try again shortly") -> None:
        super().__init__(message, retry_after=2)


class TurnFailed(ServiceError):
    """The model or its provider failed a turn: `model_*`, `max_turns_exceeded` or `model_timeout`."""

    code = "model_error"
