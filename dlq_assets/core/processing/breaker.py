"""The circuit breaker from the worker's side: setting it up, and telling which failures open it at once.

An infrastructure failure is no event's fault: it opens the breaker and costs no event an attempt. The
Dagster resource sets the breaker up through ``ensure_breaker`` too.
"""

from __future__ import annotations

from typing import Any

import psycopg

# Failures of the system around the events, not of an event: the connection, resources (disk, memory,
# connections), an operator or a timeout cancelling a statement, a lock timeout, a deadlock (class 08, 53, 55, 57,
# 58, 40: OperationalError), a missing privilege, a read-only server, a schema that lost its table or function.
# A value the target refuses (a data or integrity error, a trigger's RAISE) is the event's.
_INFRASTRUCTURE_ERRORS = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.UndefinedFunction,
)


def is_infrastructure_failure(exc: BaseException) -> bool:
    """An infrastructure failure opens the breaker and costs no event an attempt (docs/guarantees.md)."""
    return isinstance(exc, _INFRASTRUCTURE_ERRORS)


def ensure_breaker(
    conn: psycopg.Connection[Any], name: str, threshold: int | None = None, timeout_seconds: int | None = None
) -> None:
    """Create the breaker with its defaults; a threshold or timeout given is applied too, which takes the owner's
    or security_admin's rights (processors record outcomes, they do not configure the breaker)."""
    if threshold is None and timeout_seconds is None:
        conn.execute("SELECT dlq_breaker_ensure(%s)", (name,))
    else:
        conn.execute("SELECT dlq_breaker_configure(%s, %s, %s)", (name, threshold, timeout_seconds))
