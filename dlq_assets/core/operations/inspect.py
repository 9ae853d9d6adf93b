"""Read-only lookups an operator runs by hand: one event, the leases held, a breaker, the backlog by reason, the
health view and the last minute's throughput.

Every function takes an open connection and only reads, so a ``dlq_reader`` login may run all of them; none
creates what it does not find (a breaker no worker has checked yet stays absent). Plain Python: the CLI prints
what these return, they never import click, Rich or Dagster.
"""

from __future__ import annotations

from typing import Any

import psycopg

# The columns shared by dead_letter_events and dlq_poison_events that an inspection shows. The payload comes back
# as the text jsonb prints, so every number stays exact (as a float, 100000000000000000000000.5 would round).
_EVENT_COLUMNS = (
    "id, reason, source, source_inode, source_offset, priority, classification, retry_count, resolved, "
    "resolved_at, resolution_method, quarantined_at, next_attempt_at, processing_lock, lock_expires_at, "
    "created_at, idempotency_key, payload_checksum, "
    "dlq_payload_checksum(payload) = payload_checksum AS checksum_ok, "
    "payload::text AS payload, metadata_json, error_history, processing_attempts"
)
_DEAD_LETTER = f"SELECT 'dead_letter' AS table_name, {_EVENT_COLUMNS} FROM dead_letter_events WHERE id = %s"
_POISONED = (
    f"SELECT 'poison' AS table_name, {_EVENT_COLUMNS}, poisoned_at, poison_reason, redrive_count "
    "FROM dlq_poison_events WHERE id = %s"
)

# Committed leases are visible rows (processing_lock set): stale once lock_expires_at has passed. Transaction
# leases live in dlq_batch_leases with no expiry: stale once the session holding the lease is gone.
_LEASES = """
SELECT processing_lock::text AS lease, 'committed' AS kind, count(*) AS events,
       min(lock_expires_at) AS expires_at, bool_or(lock_expires_at <= now()) AS stale,
       max(processing_attempts -> -1 ->> 'worker') AS worker
  FROM dead_letter_events WHERE processing_lock IS NOT NULL AND NOT resolved
 GROUP BY processing_lock
UNION ALL
SELECT lease::text, 'transaction', sum(cardinality(event_ids)), NULL, dlq_lease_holder(lease) IS NULL,
       max(worker)
  FROM dlq_batch_leases GROUP BY lease
 ORDER BY expires_at NULLS LAST, lease
"""

BREAKER_COLUMNS = (
    "breaker_name", "state", "failure_count", "failure_threshold", "timeout_seconds", "last_failure_time",
    "opened_at", "next_attempt_time",
)  # fmt: skip
_BREAKER = f"SELECT {', '.join(BREAKER_COLUMNS)} FROM dlq_circuit_breaker_state WHERE breaker_name = %s"

# One row whether or not the breaker exists yet: a missing breaker is closed, with the table's defaults.
_BREAKER_OR_DEFAULTS = """
SELECT coalesce(b.state, 'closed') AS state, coalesce(b.failure_count, 0) AS failure_count,
       coalesce(b.failure_threshold, 5) AS failure_threshold, coalesce(b.timeout_seconds, 60) AS timeout_seconds,
       b.opened_at, b.next_attempt_time
  FROM (SELECT 1) AS one LEFT JOIN dlq_circuit_breaker_state b ON b.breaker_name = %s
"""

_THROUGHPUT = """
SELECT coalesce(sum(processed_count), 0), coalesce(sum(repaired_count), 0), coalesce(sum(processing_duration_ms), 0)
  FROM dlq_processing_metrics
 WHERE completed_at > now() - make_interval(mins => %s)
"""


def _row_dict(cur: psycopg.Cursor[Any], row: tuple[Any, ...]) -> dict[str, Any]:
    assert cur.description is not None
    return dict(zip([c.name for c in cur.description], row, strict=True))


def find_event(conn: psycopg.Connection[Any], event_id: int) -> dict[str, Any] | None:
    """The dead letter with this id, else the poisoned event with it, else None.

    ``table_name`` says which table held it (``dead_letter`` or ``poison``; a poisoned event also carries
    ``poisoned_at``, ``poison_reason`` and ``redrive_count``). ``checksum_ok`` compares the stored checksum with
    one computed from the payload now, and ``payload`` is the payload's JSON text, numbers exactly as stored.
    """
    for query in (_DEAD_LETTER, _POISONED):
        cur = conn.execute(query, (event_id,))
        row = cur.fetchone()
        if row is not None:
            return _row_dict(cur, row)
    return None


def list_leases(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every lease held, one dict each: ``lease``, ``kind`` (``committed`` or ``transaction``), ``events``,
    ``expires_at`` (None for a transaction lease), ``stale`` and the last ``worker`` named; soonest expiry first."""
    cur = conn.execute(_LEASES)
    return [_row_dict(cur, row) for row in cur.fetchall()]


def breaker_status(conn: psycopg.Connection[Any], name: str) -> dict[str, Any] | None:
    """The breaker's row (the ``BREAKER_COLUMNS``), or None when no worker has checked it yet. Only reads: a
    missing breaker is reported, not created (it is closed with the default threshold until a worker creates it)."""
    cur = conn.execute(_BREAKER, (name,))
    row = cur.fetchone()
    return None if row is None else _row_dict(cur, row)


def breaker_state(conn: psycopg.Connection[Any], name: str) -> dict[str, Any]:
    """The breaker's state, threshold, timeout and times; a breaker no worker created yet reads as closed with the
    defaults. Only reads (a reader may call it)."""
    cur = conn.execute(_BREAKER_OR_DEFAULTS, (name,))
    row = cur.fetchone()
    assert row is not None  # the LEFT JOIN from one row: always one row
    return _row_dict(cur, row)


def health_view(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The ``dlq_health`` view's one row, column by column."""
    cur = conn.execute("SELECT * FROM dlq_health")
    row = cur.fetchone()
    assert row is not None  # an aggregate view: always exactly one row
    return _row_dict(cur, row)


def due_events(conn: psycopg.Connection[Any], at_most: int) -> int:
    """Dead letters a claim would take now (due, unleased, not malicious), counted up to ``at_most``: those
    waiting out a retry backoff are pending but give a run nothing to do. Bounded, so a large backlog costs
    ``at_most`` index entries, not a scan."""
    (due,) = conn.execute(
        """
        SELECT count(*) FROM (
            SELECT 1 FROM dead_letter_events
             WHERE NOT resolved AND quarantined_at IS NULL AND next_attempt_at <= now()
               AND (processing_lock IS NULL OR lock_expires_at <= now())
               AND classification IS DISTINCT FROM 'malicious'
             LIMIT %s) due
        """,
        (at_most,),
    ).fetchone()
    return int(due)


def dead_letters_by_reason(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """How many dead letters (resolved or not; poisoned events excluded) each reason holds, the largest first."""
    return dict(conn.execute("SELECT reason, count(*) FROM dead_letter_events GROUP BY 1 ORDER BY 2 DESC").fetchall())


def pending_by_reason(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Pending dead letters (unresolved, not quarantined) per reason, the largest first."""
    return dict(
        conn.execute(
            "SELECT reason, count(*) FROM dead_letter_events WHERE NOT resolved AND quarantined_at IS NULL "
            "GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
    )


def throughput(conn: psycopg.Connection[Any], minutes: int = 1) -> dict[str, int]:
    """What the batches completed in the last ``minutes`` did: events ``processed``, events ``resolved``, and the
    milliseconds the workers were busy (``busy_ms``)."""
    row = conn.execute(_THROUGHPUT, (minutes,)).fetchone()
    assert row is not None  # an aggregate: always one row
    processed, resolved, busy_ms = row
    return {"processed": int(processed), "resolved": int(resolved), "busy_ms": int(busy_ms)}
