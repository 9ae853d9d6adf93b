"""The counts a progress display polls: events due, events the batches since a moment took, expired rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg

from dlq_assets.core.operations.progress import due_events, expired_resolved, processed_since
from tests.core.operations.test_retention import EXPIRED, add
from tests.reliability.conftest import VALID, insert_dead_letter


def test_due_events_counts_what_a_worker_may_claim_now(conn: psycopg.Connection) -> None:
    assert due_events(conn) == 0
    insert_dead_letter(conn, {**VALID, "n": 1}, priority=1, reason="truncated")
    insert_dead_letter(conn, {**VALID, "n": 2}, priority=5, reason="truncated")
    insert_dead_letter(conn, {**VALID, "n": 3}, priority=2, reason="json_parse_error")
    insert_dead_letter(conn, {**VALID, "n": 4}, next_attempt_at=datetime.now(UTC) + timedelta(hours=1))  # backoff
    insert_dead_letter(conn, {**VALID, "n": 5}, quarantined_at=datetime.now(UTC))
    insert_dead_letter(conn, {**VALID, "n": 6}, resolved=True, resolved_at=datetime.now(UTC))
    assert due_events(conn) == 3
    assert due_events(conn, priority=2) == 2
    assert due_events(conn, reason="truncated") == 2
    assert due_events(conn, priority=2, reason="truncated") == 1
    assert due_events(conn, reason="no such reason") == 0


def test_processed_since_sums_the_batches_started_from_then(conn: psycopg.Connection) -> None:
    start = datetime.now(UTC)
    assert processed_since(conn, start) == 0
    for started, size in ((start - timedelta(minutes=1), 100), (start, 7), (start + timedelta(seconds=1), 5)):
        conn.execute(
            "INSERT INTO dlq_processing_metrics (processing_session_id, processing_method, batch_size, "
            "processed_count, repaired_count, failed_count, skipped_count, processing_duration_ms, started_at, "
            "completed_at) VALUES ('t', 'test', %s, %s, 0, 0, 0, 1, %s, %s)",
            (size, size, started, started + timedelta(seconds=1)),
        )
    assert processed_since(conn, start) == 12
    assert processed_since(conn, start - timedelta(hours=1)) == 112


def test_expired_resolved_counts_resolved_rows_past_the_retention_period(conn: psycopg.Connection) -> None:
    at = EXPIRED + timedelta(days=91)
    assert expired_resolved(conn, 90, at=at) == 0
    add(conn, 3)  # resolved at EXPIRED + 1..3 minutes
    add(conn, 2, quarantined=True)  # quarantined: never retired by age
    add(conn, 4, resolved_at=None)  # unresolved
    add(conn, 1, resolved_at=at - timedelta(days=10))  # too recent
    assert expired_resolved(conn, 90, at=at) == 3
    assert expired_resolved(conn, 0, at=at) == 4
    assert expired_resolved(conn, 90, at=EXPIRED + timedelta(days=90, minutes=2)) == 1  # only the first minute's
