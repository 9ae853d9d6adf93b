"""Schema promises, each checked on a real server: columns, constraints, triggers, partitions, idempotency."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest

from dlq_assets.core import jsonutil

SEED_COLUMNS = {
    "id": "bigint",
    "ingest_id": "character varying",
    "source": "character varying",
    "source_offset": "bigint",
    "source_inode": "character varying",
    "reason": "character varying",
    "payload": "jsonb",
    "metadata_json": "jsonb",
    "payload_checksum": "character varying",
    "retry_count": "integer",
    "error_history": "jsonb",
    "processing_attempts": "jsonb",
    "resolved": "boolean",
    "resolved_at": "timestamp with time zone",
    "resolution_method": "character varying",
    "idempotency_key": "character varying",
    "processing_lock": "uuid",
    "lock_expires_at": "timestamp with time zone",
    "priority": "integer",
    "classification": "character varying",
    "created_at": "timestamp with time zone",
    "updated_at": "timestamp with time zone",
    "last_processed_at": "timestamp with time zone",
    # beyond the seed: what backoff and tamper quarantine need
    "next_attempt_at": "timestamp with time zone",
    "quarantined_at": "timestamp with time zone",
}


def columns(conn: psycopg.Connection, table: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s", (table,)
    ).fetchall()
    return dict(rows)


def insert_event(conn: psycopg.Connection, payload: object = None, **values: object) -> int | None:
    values.setdefault("reason", "json_parse_error")
    values["payload"] = json.dumps({"n": 1} if payload is None else payload)
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    row = conn.execute(
        f"INSERT INTO dead_letter_events ({names}) VALUES ({marks}) RETURNING id", list(values.values())
    ).fetchone()
    return row[0] if row else None


def test_dead_letter_events_has_every_seed_column(conn: psycopg.Connection) -> None:
    assert columns(conn, "dead_letter_events") == SEED_COLUMNS


def test_table_is_range_partitioned_by_created_at_with_default(conn: psycopg.Connection) -> None:
    (strategy, key) = conn.execute(
        "SELECT partstrat, pg_get_partkeydef('dead_letter_events'::regclass) FROM pg_partitioned_table "
        "WHERE partrelid = 'dead_letter_events'::regclass"
    ).fetchone()
    assert (strategy, key) == ("r", "RANGE (created_at)")
    parts = conn.execute("SELECT partition_name, is_default FROM dlq_partitions").fetchall()
    assert ("dead_letter_events_default", True) in parts
    this_month = datetime.now(UTC).strftime("%Y%m")
    assert f"dead_letter_events_p{this_month}" in {name for name, _ in parts}


@pytest.mark.parametrize(("column", "value"), [("priority", 0), ("priority", 11), ("retry_count", -1)])
def test_check_constraints_reject_out_of_range(conn: psycopg.Connection, column: str, value: int) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        insert_event(conn, **{column: value})


def test_priority_defaults_to_5_and_range_1_to_10_is_accepted(conn: psycopg.Connection) -> None:
    event_id = insert_event(conn)
    assert conn.execute("SELECT priority FROM dead_letter_events WHERE id = %s", (event_id,)).fetchone() == (5,)
    for priority in (1, 10):
        assert insert_event(conn, payload={"p": priority}, priority=priority) is not None


def test_checksum_is_set_at_insert_and_matches_python(conn: psycopg.Connection) -> None:
    payload = {"b": [1.50, "é"], "a": {"z": None}}
    event_id = insert_event(conn, payload=payload)
    (stored,) = conn.execute("SELECT payload_checksum FROM dead_letter_events WHERE id = %s", (event_id,)).fetchone()
    assert stored == jsonutil.payload_checksum(jsonutil.loads(json.dumps(payload)))


def test_a_producer_checksum_that_does_not_match_is_refused(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.DataException, match="does not match"):
        insert_event(conn, payload_checksum="0" * 64)


@pytest.mark.parametrize("checksum", ["a" * 63, "A" * 64, "g" * 64, "a" * 63 + "\n", " " + "a" * 63, "é" * 64, ""])
def test_the_checksum_constraint_holds_without_the_triggers(conn: psycopg.Connection, checksum: str) -> None:
    """Defence in depth: with the triggers off (replica mode, as a bulk loader runs) the shape is still checked."""
    conn.execute("SET session_replication_role = replica")
    try:
        with pytest.raises(psycopg.errors.CheckViolation, match="checksum_is_sha256"):
            insert_event(conn, payload_checksum=checksum, idempotency_key="k")
        assert insert_event(conn, payload_checksum="0123456789abcdef" * 4, idempotency_key="k") is not None
    finally:
        conn.execute("RESET session_replication_role")


def test_updated_at_is_maintained_by_trigger(conn: psycopg.Connection) -> None:
    event_id = insert_event(conn)
    (before,) = conn.execute("SELECT updated_at FROM dead_letter_events WHERE id = %s", (event_id,)).fetchone()
    time.sleep(0.01)
    conn.execute("UPDATE dead_letter_events SET retry_count = 1 WHERE id = %s", (event_id,))
    (after,) = conn.execute("SELECT updated_at FROM dead_letter_events WHERE id = %s", (event_id,)).fetchone()
    assert after > before


def test_updated_at_is_now_whatever_a_statement_sets(conn: psycopg.Connection) -> None:
    """The row trigger (25_event_rules.sql) is skipped only for rows a statement stamps with now(), never otherwise."""
    event_id = insert_event(conn)
    conn.execute("UPDATE dead_letter_events SET updated_at = '2001-01-01' WHERE id = %s", (event_id,))
    (kept,) = conn.execute("SELECT updated_at FROM dead_letter_events WHERE id = %s", (event_id,)).fetchone()
    assert kept.year > 2001
    with conn.transaction():
        (now,) = conn.execute("SELECT now()").fetchone()
        conn.execute("UPDATE dead_letter_events SET updated_at = now(), retry_count = 2 WHERE id = %s", (event_id,))
        conn.execute("UPDATE dead_letter_events SET retry_count = 3 WHERE id = %s", (event_id,))  # again, same tx
        (stamped,) = conn.execute("SELECT updated_at FROM dead_letter_events WHERE id = %s", (event_id,)).fetchone()
    assert stamped == now


@pytest.mark.parametrize(
    "assignment",
    [
        "payload_checksum = repeat('a', 64)",
        "idempotency_key = 'other'",
        "created_at = created_at - interval '40 days'",
        "idempotency_key = 'other', updated_at = now()",  # a stamped row is still checked
    ],
)
def test_identity_checksum_and_partition_key_are_immutable(conn: psycopg.Connection, assignment: str) -> None:
    event_id = insert_event(conn)
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="immutable"):
        conn.execute(f"UPDATE dead_letter_events SET {assignment} WHERE id = %s", (event_id,))


def test_same_idempotency_key_in_two_different_months_is_one_event(conn: psycopg.Connection) -> None:
    september = datetime(2026, 9, 14, 12, tzinfo=UTC)
    november = datetime(2026, 11, 2, 8, tzinfo=UTC)
    conn.execute("SELECT dlq_ensure_partitions(%s, 3)", (september,))
    first = insert_event(conn, idempotency_key="cowrie:abc", created_at=september)
    second = insert_event(conn, idempotency_key="cowrie:abc", created_at=november)
    assert first is not None and second is None
    rows = conn.execute(
        "SELECT tableoid::regclass::text, created_at FROM dead_letter_events WHERE idempotency_key = 'cowrie:abc'"
    ).fetchall()
    assert rows == [("dead_letter_events_p202609", september)]
    assert conn.execute("SELECT count(*) FROM dlq_idempotency_keys").fetchone() == (1,)
    # The months really are different partitions: another key lands in November's.
    insert_event(conn, idempotency_key="cowrie:def", created_at=november)
    (part,) = conn.execute(
        "SELECT tableoid::regclass::text FROM dead_letter_events WHERE idempotency_key = 'cowrie:def'"
    ).fetchone()
    assert part == "dead_letter_events_p202611"


def test_concurrent_inserts_of_one_key_keep_one_event(db_url: str) -> None:
    with psycopg.connect(db_url) as a, psycopg.connect(db_url, autocommit=True) as b:
        assert insert_event(a, idempotency_key="race", created_at=datetime(2026, 10, 1, tzinfo=UTC)) is not None
        result: list[int | None] = []
        worker = threading.Thread(
            target=lambda: result.append(insert_event(b, idempotency_key="race", created_at=datetime.now(UTC)))
        )
        worker.start()
        time.sleep(0.2)  # b now waits on a's uncommitted key
        a.commit()
        worker.join(10)
        assert result == [None]
        assert a.execute("SELECT count(*) FROM dead_letter_events WHERE idempotency_key = 'race'").fetchone() == (1,)


def test_key_is_derived_from_source_position_and_checksum_when_absent(conn: psycopg.Connection) -> None:
    values = {"source": "/var/log/cowrie.json", "source_inode": "42", "source_offset": 1024}
    assert insert_event(conn, **values) is not None
    assert insert_event(conn, **values) is None  # the same record read twice
    assert insert_event(conn, payload={"n": 2}, **values) is not None  # different bytes at that position


def test_ensure_partitions_creates_months_ahead_and_moves_early_rows_out_of_default(conn: psycopg.Connection) -> None:
    far = datetime(2031, 5, 20, tzinfo=UTC)
    event_id = insert_event(conn, created_at=far)
    assert conn.execute(
        "SELECT tableoid::regclass::text FROM dead_letter_events WHERE id = %s", (event_id,)
    ).fetchone() == ("dead_letter_events_default",)
    created = [r[0] for r in conn.execute("SELECT * FROM dlq_ensure_partitions(%s, 2)", (far,)).fetchall()]
    assert created == ["dead_letter_events_p203105", "dead_letter_events_p203106", "dead_letter_events_p203107"]
    row = conn.execute(
        "SELECT tableoid::regclass::text, payload_checksum IS NOT NULL FROM dead_letter_events WHERE id = %s",
        (event_id,),
    ).fetchone()
    assert row == ("dead_letter_events_p203105", True)
    assert conn.execute("SELECT count(*) FROM dead_letter_events_default").fetchone() == (0,)
    # Idempotent: a second call creates nothing; the moved row keeps its key and stays unique.
    assert conn.execute("SELECT * FROM dlq_ensure_partitions(%s, 2)", (far,)).fetchall() == []
    assert insert_event(conn, created_at=far) is None


def test_new_partitions_inherit_indexes_and_triggers(conn: psycopg.Connection) -> None:
    conn.execute("SELECT dlq_ensure_partitions('2030-01-15', 0)")
    indexes = {
        r[0]
        for r in conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'dead_letter_events_p203001'"
        ).fetchall()
    }
    assert any("WHERE ((NOT resolved) AND (quarantined_at IS NULL))" in d for d in indexes)
    triggers = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'dead_letter_events_p203001'::regclass AND NOT tgisinternal"
    ).fetchone()
    assert triggers == (3,)  # insert, update, and the lease revocation on classification (0010)


def test_bookkeeping_tables_have_the_seed_columns(conn: psycopg.Connection) -> None:
    metrics = columns(conn, "dlq_processing_metrics")
    for name in [
        "processing_session_id",
        "processing_method",
        "batch_size",
        "processed_count",
        "repaired_count",
        "failed_count",
        "skipped_count",
        "processing_duration_ms",
        "avg_processing_time_ms",
        "circuit_breaker_triggered",
        "started_at",
        "completed_at",
    ]:
        assert name in metrics, name
    breaker = columns(conn, "dlq_circuit_breaker_state")
    for name in [
        "breaker_name",
        "state",
        "failure_count",
        "last_failure_time",
        "next_attempt_time",
        "failure_threshold",
        "timeout_seconds",
    ]:
        assert name in breaker, name
    assert conn.execute(
        "SELECT column_default FROM information_schema.columns "
        "WHERE table_name = 'dlq_circuit_breaker_state' AND column_name = 'failure_threshold'"
    ).fetchone() == ("5",)
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO dlq_circuit_breaker_state (breaker_name, state) VALUES ('x', 'ajar')")


def test_poison_table_keeps_every_event_column_and_history(conn: psycopg.Connection) -> None:
    poison = columns(conn, "dlq_poison_events")
    assert set(SEED_COLUMNS) <= set(poison)
    assert {"poisoned_at", "poison_reason", "last_error", "redrive_count"} <= set(poison)
    event_id = insert_event(conn, retry_count=10, error_history=json.dumps([{"error": "boom"}]))
    conn.execute(
        "WITH moved AS (DELETE FROM dead_letter_events WHERE id = %s RETURNING *) "
        "INSERT INTO dlq_poison_events SELECT moved.*, now(), 'max_attempts' FROM moved",
        (event_id,),
    )
    assert conn.execute("SELECT error_history, retry_count FROM dlq_poison_events").fetchone() == (
        [{"error": "boom"}],
        10,
    )


def test_health_view_has_every_seed_column_and_counts_right(conn: psycopg.Connection) -> None:
    old = datetime(2026, 10, 3, tzinfo=UTC)
    insert_event(conn, payload={"a": 1}, created_at=old)
    insert_event(conn, payload={"a": 2}, retry_count=6, priority=2)
    insert_event(conn, payload={"a": 3}, classification="malicious")
    resolved = insert_event(conn, payload={"a": 4})
    conn.execute("UPDATE dead_letter_events SET resolved = true, resolved_at = now() WHERE id = %s", (resolved,))
    conn.execute(
        "UPDATE dead_letter_events SET processing_lock = gen_random_uuid(), lock_expires_at = now() - interval '1 s' "
        "WHERE payload = '{\"a\": 2}'"
    )
    health = conn.execute("SELECT * FROM dlq_health").fetchone()
    names = [c.name for c in conn.execute("SELECT * FROM dlq_health LIMIT 0").description]
    row = dict(zip(names, health, strict=True))
    for seed_column in [
        "pending_events",
        "processed_events",
        "avg_resolution_time_seconds",
        "oldest_unresolved_event",
        "high_retry_events",
        "locked_events",
        "malicious_events",
        "high_priority_events",
    ]:
        assert seed_column in row
    assert row["pending_events"] == 3
    assert row["processed_events"] == 1
    assert row["oldest_unresolved_event"] == old  # the seed's MAX() would report the newest
    assert row["high_retry_events"] == 1
    assert row["locked_events"] == 0 and row["stale_locks"] == 1
    assert row["malicious_events"] == 1
    assert row["high_priority_events"] == 1
    assert row["total_events"] == 4
