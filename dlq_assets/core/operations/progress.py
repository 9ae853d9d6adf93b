"""How much work a long run has ahead and has done, read from the tables it changes.

A progress display counts with these from a connection of its own while the work runs elsewhere: the work needs
no hooks, and the rows of several worker processes add up. Read-only; plain Python, no click, Rich or Dagster.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

_DUE = """
SELECT count(*) FROM dead_letter_events
 WHERE NOT resolved AND quarantined_at IS NULL AND next_attempt_at <= now()
   AND (%(priority)s::int IS NULL OR priority <= %(priority)s) AND (%(reason)s::text IS NULL OR reason = %(reason)s)
"""
_PROCESSED_SINCE = "SELECT coalesce(sum(batch_size), 0) FROM dlq_processing_metrics WHERE started_at >= %s"
_EXPIRED = """
SELECT count(*) FROM dead_letter_events
 WHERE resolved AND quarantined_at IS NULL AND resolved_at < %(at)s - make_interval(days => %(days)s)
"""


def _count(conn: psycopg.Connection[Any], query: str, params: Any) -> int:
    row = conn.execute(query, params).fetchone()
    assert row is not None  # an aggregate: always one row
    return int(row[0])


def due_events(conn: psycopg.Connection[Any], *, priority: int | None = None, reason: str | None = None) -> int:
    """Dead letters a worker may claim now: unresolved, not quarantined, their next attempt due; optionally only
    those of ``priority`` or higher (1 is highest) and only those with ``reason``."""
    return _count(conn, _DUE, {"priority": priority, "reason": reason})


def processed_since(conn: psycopg.Connection[Any], started: datetime) -> int:
    """Events the batches started at or after ``started`` have taken, by their metrics rows (a batch's row is
    written when it ends, so this counts finished batches)."""
    return _count(conn, _PROCESSED_SINCE, (started,))


def expired_resolved(conn: psycopg.Connection[Any], older_than_days: int, *, at: datetime) -> int:
    """Resolved, non-quarantined dead letters resolved more than ``older_than_days`` days before ``at``: the rows
    a retention run started at ``at`` retires."""
    return _count(conn, _EXPIRED, {"at": at, "days": older_than_days})
