"""Redrive from the poison table: selection, history kept, cycle protection, pacing, dry run."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from dlq_assets.core.operations.redrive import redrive
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.pool import process

VALID = {
    "eventid": "cowrie.session.connect",
    "timestamp": "2024-01-15T10:30:00.123456Z",
    "session": "3f2a9c0b1d4e",
    "src_ip": "203.0.113.10",
}


def poison(
    conn: psycopg.Connection, n: int, reason: str = "target_unavailable", error: str = "handler_missing"
) -> list[int]:
    """n events driven into the poison table through the real state machine."""
    ids = [
        conn.execute(
            "INSERT INTO dead_letter_events (reason, payload) VALUES (%s, %s) RETURNING id",
            (reason, json.dumps({**VALID, "n": i, "reason": reason})),
        ).fetchone()[0]
        for i in range(n)
    ]
    lease = conn.execute("SELECT processing_lock FROM dlq_claim_events(%s, 60, NULL, %s)", (n, reason)).fetchone()[0]
    conn.execute("SELECT * FROM dlq_complete_batch(%s, %s, %s, NULL, %s)", (lease, ids, ["failed"] * n, [error] * n))
    assert conn.execute("SELECT count(*) FROM dlq_poison_events WHERE id = ANY(%s)", (ids,)).fetchone() == (n,)
    return ids


def snapshot(conn: psycopg.Connection) -> tuple:
    return (
        conn.execute("SELECT * FROM dead_letter_events ORDER BY id").fetchall(),
        conn.execute("SELECT * FROM dlq_poison_events ORDER BY id").fetchall(),
        conn.execute("SELECT * FROM dlq_idempotency_keys ORDER BY 1").fetchall(),
    )


def test_redrive_by_ids_moves_events_back_with_their_history(db_url: str, conn: psycopg.Connection) -> None:
    ids = poison(conn, 3)
    before = conn.execute(
        "SELECT id, idempotency_key, payload_checksum, error_history FROM dlq_poison_events"
    ).fetchall()
    report = redrive(db_url, ids=ids[:2])
    assert sorted(report.redriven) == ids[:2] and report.kept == {}
    rows = conn.execute(
        "SELECT id, idempotency_key, payload_checksum, error_history, retry_count, metadata_json ->> 'redrive_count', "
        "next_attempt_at <= now(), resolved FROM dead_letter_events ORDER BY id"
    ).fetchall()
    assert [r[0] for r in rows] == ids[:2]
    for row, (pid, key, checksum, history) in zip(rows, before, strict=False):
        assert (row[0], row[1], row[2]) == (pid, key, checksum)  # same identity, key and checksum
        assert row[3][: len(history)] == history and row[3][-1]["redriven"] == 1  # history kept, redrive noted
        assert (row[4], row[5], row[6], row[7]) == (0, "1", True, False)
    assert conn.execute("SELECT id FROM dlq_poison_events").fetchall() == [(ids[2],)]


def test_redriven_events_are_processed_again(db_url: str, conn: psycopg.Connection) -> None:
    ids = poison(conn, 2)
    redrive(db_url, reason="target_unavailable")
    report = process(db_url, WorkerConfig(batch_size=10, min_batch_size=1, max_batch_size=10))
    assert report.resolved == 2
    assert conn.execute("SELECT count(*) FROM raw_events WHERE dlq_event_id = ANY(%s)", (ids,)).fetchone() == (2,)


def test_selection_by_reason_and_time_range(db_url: str, conn: psycopg.Connection) -> None:
    a = poison(conn, 2, reason="target_unavailable")
    b = poison(conn, 2, reason="timeout")
    conn.execute("UPDATE dlq_poison_events SET poisoned_at = now() - interval '3 days' WHERE id = ANY(%s)", (b,))
    assert sorted(redrive(db_url, reason="timeout", dry_run=True).redriven) == b
    recent = redrive(db_url, since=datetime.now(UTC) - timedelta(days=1))
    assert sorted(recent.redriven) == a
    old = redrive(db_url, until=datetime.now(UTC) - timedelta(days=2))
    assert sorted(old.redriven) == b


def test_cycle_protection_keeps_an_event_redriven_too_often(db_url: str, conn: psycopg.Connection) -> None:
    (event_id,) = poison(conn, 1)
    for cycle in range(1, 3):
        assert redrive(db_url, ids=[event_id], max_redrives=2).redriven == [event_id]
        lease = conn.execute("SELECT processing_lock FROM dlq_claim_events(1, 60)").fetchone()[0]
        conn.execute(
            "SELECT * FROM dlq_complete_batch(%s, %s, %s, NULL, %s)",
            (lease, [event_id], ["failed"], ["handler_missing"]),
        )
        assert conn.execute("SELECT redrive_count FROM dlq_poison_events").fetchone() == (cycle,)
    third = redrive(db_url, ids=[event_id], max_redrives=2)
    assert third.redriven == [] and third.kept == {event_id: "kept: redriven 2 times (max 2)"}
    assert conn.execute("SELECT count(*) FROM dlq_poison_events").fetchone() == (1,)


def test_batches_commit_separately_and_are_paced(db_url: str, conn: psycopg.Connection) -> None:
    poison(conn, 7)
    report = redrive(db_url, reason="target_unavailable", batch_size=3, max_per_second=50)
    assert len(report.redriven) == 7 and report.batches == 3
    assert report.seconds >= (7 - 1) / 50 * 0.9  # paced: at most 50 events a second
    assert conn.execute("SELECT count(*) FROM dlq_poison_events").fetchone() == (0,)


def test_limit_stops_early(db_url: str, conn: psycopg.Connection) -> None:
    poison(conn, 5)
    assert len(redrive(db_url, reason="target_unavailable", batch_size=2, limit=3).redriven) == 3
    assert conn.execute("SELECT count(*) FROM dlq_poison_events").fetchone() == (2,)


def test_dry_run_writes_nothing(db_url: str, conn: psycopg.Connection) -> None:
    ids = poison(conn, 3)
    before = snapshot(conn)
    report = redrive(db_url, ids=ids, dry_run=True)
    assert sorted(report.redriven) == ids and report.dry_run
    assert snapshot(conn) == before


def test_a_selection_is_required(db_url: str, conn: psycopg.Connection) -> None:
    with pytest.raises(ValueError, match="choose what to redrive"):
        redrive(db_url)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT * FROM dlq_redrive()")


def test_a_redriven_event_is_not_a_duplicate_of_itself_but_a_copy_still_is(
    conn: psycopg.Connection, db_url: str
) -> None:
    (event_id,) = poison(conn, 1)
    key = conn.execute("SELECT idempotency_key FROM dlq_poison_events").fetchone()[0]
    redrive(db_url, ids=[event_id])
    copy = conn.execute(
        "INSERT INTO dead_letter_events (reason, payload, idempotency_key) VALUES ('x', '{}', %s) RETURNING id", (key,)
    ).fetchone()
    assert copy is None  # the key still guards against second copies
