"""The operator's read-only lookups: one event from either table, leases, a breaker, the health view, the
backlog by reason and the last minutes' throughput."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg

from dlq_assets.core.operations.control import set_breaker
from dlq_assets.core.operations.inspect import (
    BREAKER_COLUMNS,
    breaker_status,
    dead_letters_by_reason,
    find_event,
    health_view,
    list_leases,
    throughput,
)
from tests.core.operations.test_redrive import poison
from tests.reliability.conftest import VALID, insert_dead_letter, wait_until

EXACT = '{"n": 100000000000000000000000.5}'  # a float would round it


def test_find_event_reads_a_dead_letter_with_its_payload_text_exact(conn: psycopg.Connection) -> None:
    (event_id,) = conn.execute(
        "INSERT INTO dead_letter_events (reason, payload) VALUES ('json_parse_error', %s::jsonb) RETURNING id",
        (EXACT,),
    ).fetchone()
    event = find_event(conn, event_id)
    assert event is not None
    assert (event["table_name"], event["id"], event["reason"]) == ("dead_letter", event_id, "json_parse_error")
    assert event["payload"] == EXACT and event["checksum_ok"] is True
    assert event["error_history"] == [] and event["processing_attempts"] == []
    assert "poison_reason" not in event

    conn.execute("UPDATE dead_letter_events SET payload = '{\"x\": 1}' WHERE id = %s", (event_id,))
    assert find_event(conn, event_id)["checksum_ok"] is False  # type: ignore[index]
    assert find_event(conn, event_id + 1000) is None


def test_find_event_falls_back_to_the_poison_table(conn: psycopg.Connection) -> None:
    (event_id,) = poison(conn, 1, error="handler_missing")
    event = find_event(conn, event_id)
    assert event is not None
    assert (event["table_name"], event["id"], event["redrive_count"]) == ("poison", event_id, 0)
    assert event["poisoned_at"] is not None and event["poison_reason"] and event["checksum_ok"] is True


def test_list_leases_shows_committed_and_transaction_leases_and_when_they_are_stale(
    db_url: str, conn: psycopg.Connection
) -> None:
    assert list_leases(conn) == []
    for i in range(5):
        insert_dead_letter(conn, {**VALID, "n": i})
    (committed,) = {row[0] for row in conn.execute("SELECT processing_lock FROM dlq_claim_events(2, 60)")}
    lease = uuid.uuid4()
    with psycopg.connect(db_url) as batch:  # a transaction lease: held while its holder's transaction is open
        ids = [i for (i,) in batch.execute("SELECT id FROM dlq_claim_batch(%s, 3)", (lease,))]
        conn.execute("SELECT dlq_journal_batch(%s, %s, 'inspect-test')", (lease, ids))
        first, second = list_leases(conn)  # an expiry first, none last
        assert first == {"lease": str(committed), "kind": "committed", "events": 2, "expires_at": first["expires_at"],
                         "stale": False, "worker": None}  # fmt: skip
        assert first["expires_at"] > datetime.now(UTC)
        assert second == {"lease": str(lease), "kind": "transaction", "events": 3, "expires_at": None,
                          "stale": False, "worker": "inspect-test"}  # fmt: skip
        conn.execute(
            "UPDATE dead_letter_events SET lock_expires_at = now() - interval '1 s' WHERE processing_lock = %s",
            (committed,),
        )
        assert [row["stale"] for row in list_leases(conn)] == [True, False]
    wait_until(lambda: [row["stale"] for row in list_leases(conn)] == [True, True], "the dead holder seen")


def test_breaker_status_reads_without_creating(conn: psycopg.Connection) -> None:
    breakers = "SELECT count(*) FROM dlq_circuit_breaker_state"
    (before,) = conn.execute(breakers).fetchone()
    assert breaker_status(conn, "cold") is None
    assert conn.execute(breakers).fetchone() == (before,)  # nothing created
    set_breaker(conn, "cold", "open")
    state = breaker_status(conn, "cold")
    assert state is not None and tuple(state) == BREAKER_COLUMNS
    assert (state["breaker_name"], state["state"]) == ("cold", "open") and state["opened_at"] is not None


def test_health_view_and_dead_letters_by_reason(conn: psycopg.Connection) -> None:
    assert dead_letters_by_reason(conn) == {}
    for i in range(3):
        insert_dead_letter(conn, {**VALID, "n": i}, reason="truncated")
    insert_dead_letter(conn, {**VALID, "n": 9}, reason="json_parse_error")
    assert list(dead_letters_by_reason(conn).items()) == [("truncated", 3), ("json_parse_error", 1)]
    view = health_view(conn)
    assert (view["pending_events"], view["total_events"], view["poisoned_events"]) == (4, 4, 0)


def test_throughput_counts_only_the_batches_completed_within_the_window(conn: psycopg.Connection) -> None:
    assert throughput(conn) == {"processed": 0, "resolved": 0, "busy_ms": 0}
    now = datetime.now(UTC)
    for completed, processed, resolved, busy_ms in ((now, 10, 7, 120), (now - timedelta(minutes=5), 100, 90, 900)):
        conn.execute(
            "INSERT INTO dlq_processing_metrics (processing_session_id, processing_method, batch_size, "
            "processed_count, repaired_count, failed_count, skipped_count, processing_duration_ms, started_at, "
            "completed_at) VALUES ('t', 'test', %s, %s, %s, 0, 0, %s, %s, %s)",
            (processed, processed, resolved, busy_ms, completed - timedelta(seconds=1), completed),
        )
    assert throughput(conn) == {"processed": 10, "resolved": 7, "busy_ms": 120}
    assert throughput(conn, minutes=10) == {"processed": 110, "resolved": 97, "busy_ms": 1020}
