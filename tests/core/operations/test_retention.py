"""Retention: batched deletes of expired resolved events, expired partition drops, tombstones, dry runs."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from dlq_assets.core.operations.retention import run_retention
from tests.core.processing.test_claim import claimed_plans

OLD_MONTHS = ("dead_letter_events_p202401", "dead_letter_events_p202402", "dead_letter_events_p202403")
EXPIRED = datetime(2024, 4, 1, tzinfo=UTC)  # resolved long before any 90-day cutoff


def add(
    conn: psycopg.Connection,
    n: int = 1,
    *,
    created: datetime = datetime(2024, 1, 15, tzinfo=UTC),
    resolved_at: datetime | None = EXPIRED,
    quarantined: bool = False,
    key: str | None = None,
) -> list[int]:
    """n events created at `created`, resolved at `resolved_at` + g minutes (unresolved when None)."""
    rows = conn.execute(
        """
        INSERT INTO dead_letter_events (reason, payload, idempotency_key, created_at, resolved, resolved_at,
                                        quarantined_at)
        SELECT 'json_parse_error', jsonb_build_object('tag', %(tag)s::text, 'n', g), %(key)s, %(created)s::timestamptz,
               %(resolved_at)s::timestamptz IS NOT NULL, %(resolved_at)s::timestamptz + make_interval(mins => g),
               CASE WHEN %(quarantined)s THEN now() END
          FROM generate_series(1, %(n)s) AS g
        RETURNING id
        """,
        {"tag": uuid.uuid4().hex, "key": key, "created": created, "resolved_at": resolved_at, "n": n,
         "quarantined": quarantined},
    ).fetchall()  # fmt: skip
    return sorted(r[0] for r in rows)


def ids(conn: psycopg.Connection, table: str = "dead_letter_events") -> set[int]:
    return {r[0] for r in conn.execute(f"SELECT id FROM {table}").fetchall()}


def partitions(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT partition_name FROM dlq_partitions").fetchall()}


def current_month(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT dlq_partition_name(now())").fetchone()[0]


@pytest.fixture
def old_months(conn: psycopg.Connection) -> psycopg.Connection:
    """Partitions for January to March 2024, beside the migration's current ones."""
    conn.execute("SELECT dlq_ensure_partitions('2024-01-01', 2)")
    return conn


def test_deletes_only_resolved_events_older_than_the_cutoff(old_months: psycopg.Connection, db_url: str) -> None:
    conn = old_months
    now = datetime.now(UTC)
    expired = add(conn, 5) + add(conn, 2, created=now - timedelta(days=120), resolved_at=now - timedelta(days=100))
    kept = add(conn, 2, resolved_at=None)  # unresolved
    kept += add(conn, 2, quarantined=True)  # quarantined (resolved and expired too: quarantine alone protects it)
    kept += add(conn, 3, created=now - timedelta(days=120), resolved_at=now - timedelta(days=80))  # recent
    poisoned = add(conn, 1, resolved_at=None)
    assert conn.execute(
        "SELECT record_dlq_processing_failure(%s, 'handler_missing', 'no handler')", poisoned
    ).fetchone() == ("poisoned",)
    # a resolved, expired row that also sits in the poison table (a redriven copy) is left alone
    also_poisoned = add(conn, 1)
    conn.execute(
        "INSERT INTO dlq_poison_events SELECT e.*, now(), 'max_attempts', NULL, 1 FROM dead_letter_events e "
        "WHERE id = %s",
        also_poisoned,
    )
    kept += also_poisoned
    before, poison_before = ids(conn), ids(conn, "dlq_poison_events")
    assert before == set(expired + kept)

    report = run_retention(db_url, drop_partitions=False)

    assert ids(conn) == before - set(expired) == set(kept)
    assert ids(conn, "dlq_poison_events") == poison_before == set(poisoned + also_poisoned)
    assert report.rows_deleted == len(expired) and report.batches == 1 and not report.dry_run
    assert report.partitions_dropped == [] and report.partitions_kept == {}


def test_batches_each_commit_on_their_own_oldest_first(old_months: psycopg.Connection, db_url: str) -> None:
    conn = old_months
    events = add(conn, 30)  # resolved one minute apart, in id order
    conn.execute("CREATE TABLE deleted_by (xid xid8, id bigint)")
    conn.execute(
        "CREATE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO public.deleted_by VALUES (pg_current_xact_id(), OLD.id); RETURN OLD; END $$"
    )
    conn.execute(
        "CREATE TRIGGER log_delete AFTER DELETE ON dead_letter_events FOR EACH ROW EXECUTE FUNCTION log_delete()"
    )

    report = run_retention(db_url, batch_size=7, max_batches=2, drop_partitions=False)

    assert (report.rows_deleted, report.batches) == (14, 2)
    # committed (seen from this other connection), the 14 oldest, in two transactions of 7
    assert ids(conn) == set(events[14:])
    per_xact = conn.execute("SELECT count(*) FROM deleted_by GROUP BY xid ORDER BY min(id)").fetchall()
    assert per_xact == [(7,), (7,)]
    assert report.oldest_remaining == EXPIRED + timedelta(minutes=15)

    report = run_retention(db_url, batch_size=7, drop_partitions=False)
    assert (report.rows_deleted, report.batches) == (16, 3)  # 7 + 7 + 2: the short batch ends the run
    assert ids(conn) == set() and report.oldest_remaining is None


def test_thirty_rows_in_batches_of_seven_take_five_batches(old_months: psycopg.Connection, db_url: str) -> None:
    add(old_months, 30)
    report = run_retention(db_url, batch_size=7)
    assert (report.rows_deleted, report.batches) == (30, 5)
    assert ids(old_months) == set()


def test_locked_rows_are_skipped_not_waited_on(old_months: psycopg.Connection, db_url: str) -> None:
    conn = old_months
    events = add(conn, 5)
    timeout = f"{db_url}{'&' if '?' in db_url else '?'}options=-c%20statement_timeout%3D5000"
    with psycopg.connect(db_url) as worker:
        worker.execute("SELECT id FROM dead_letter_events WHERE id = %s FOR UPDATE", (events[0],))
        with psycopg.connect(timeout, autocommit=True) as other:
            assert other.execute("SHOW statement_timeout").fetchone() == ("5s",)
            started = time.monotonic()
            assert other.execute("SELECT cleanup_resolved_dlq_events_enhanced(90, 100)").fetchone() == (4,)
            assert time.monotonic() - started < 2
        assert ids(conn) == {events[0]}
        # The partition is all expired, but dropping it needs the table to itself: the wait is capped by
        # lock_timeout (2s), under the 5s statement_timeout, and the partition is kept for the next run.
        started = time.monotonic()
        report = run_retention(timeout)
        assert time.monotonic() - started < 5
        assert report.rows_deleted == 0
        assert "busy" in report.partitions_kept["dead_letter_events_p202401"]
        assert "dead_letter_events_p202401" in partitions(conn)
    report = run_retention(db_url)  # the worker is gone: the row and then its partition go
    assert report.rows_deleted == 1 and "dead_letter_events_p202401" in report.partitions_dropped
    assert ids(conn) == set()


def test_expired_partitions_are_dropped_and_busy_ones_kept_with_the_reason(
    old_months: psycopg.Connection, db_url: str
) -> None:
    conn = old_months
    add(conn, 3)  # January: all expired
    add(conn, 2, created=datetime(2024, 2, 10, tzinfo=UTC))  # February: expired...
    unresolved = add(conn, 1, created=datetime(2024, 2, 11, tzinfo=UTC), resolved_at=None)  # ...but one is not
    add(conn, 1, created=datetime(2023, 6, 1, tzinfo=UTC))  # no month partition: in the default one
    # March stays empty
    current = current_month(conn)
    fresh = add(
        conn, 1, created=datetime.now(UTC) - timedelta(minutes=5), resolved_at=datetime.now(UTC) - timedelta(minutes=4)
    )

    report = run_retention(db_url)

    assert report.rows_deleted == 6
    assert report.partitions_dropped == ["dead_letter_events_p202401", "dead_letter_events_p202403"]
    assert report.partitions_kept["dead_letter_events_p202402"] == "1 unresolved"
    assert report.partitions_kept["dead_letter_events_default"] == "default partition"
    assert report.partitions_kept[current] == "current or future month"
    assert not {"dead_letter_events_p202401", "dead_letter_events_p202403"} & partitions(conn)
    assert ids(conn) == set(unresolved + fresh)

    # Even with no retention period at all, the default and current partitions stay (their rows go).
    report = run_retention(db_url, older_than_days=0)
    assert report.rows_deleted == 1
    assert {"dead_letter_events_default", current, "dead_letter_events_p202402"} <= partitions(conn)
    assert report.partitions_kept[current] == "current or future month"
    assert ids(conn) == set(unresolved)


def test_partition_reasons_name_quarantined_recent_and_poisoned_rows(
    old_months: psycopg.Connection, db_url: str
) -> None:
    conn = old_months
    add(conn, 1, quarantined=True)
    add(conn, 1, created=datetime(2024, 2, 10, tzinfo=UTC), resolved_at=datetime.now(UTC) - timedelta(days=1))
    poisoned = add(conn, 1, created=datetime(2024, 3, 10, tzinfo=UTC))
    conn.execute(
        "INSERT INTO dlq_poison_events SELECT e.*, now(), 'max_attempts', NULL, 1 FROM dead_letter_events e "
        "WHERE id = %s",
        poisoned,
    )
    kept = run_retention(db_url).partitions_kept
    assert kept["dead_letter_events_p202401"] == "1 quarantined"
    assert kept["dead_letter_events_p202402"] == "1 resolved within the retention period"
    assert kept["dead_letter_events_p202403"] == "1 also in dlq_poison_events"
    assert set(OLD_MONTHS) <= partitions(conn)


def test_idempotency_keys_outlive_their_events(old_months: psycopg.Connection, db_url: str) -> None:
    conn = old_months
    (event,) = add(conn, 1, key="cowrie:tombstone-1")
    assert run_retention(db_url).rows_deleted == 1
    assert ids(conn) == set()
    assert conn.execute(
        "SELECT event_id FROM dlq_idempotency_keys WHERE idempotency_key = 'cowrie:tombstone-1'"
    ).fetchone() == (event,)
    again = conn.execute(
        "INSERT INTO dead_letter_events (reason, payload, idempotency_key) "
        "VALUES ('json_parse_error', '{\"re\": \"read\"}', 'cowrie:tombstone-1') RETURNING id"
    ).fetchone()
    assert again is None and ids(conn) == set()


def snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    """Every row retention could touch, the partition list, and the tuple counters of the event tables."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return {
        "events": conn.execute("SELECT tableoid::regclass, e::text FROM dead_letter_events e ORDER BY id").fetchall(),
        "keys": conn.execute("SELECT k::text FROM dlq_idempotency_keys k ORDER BY idempotency_key").fetchall(),
        "poison": conn.execute("SELECT p::text FROM dlq_poison_events p ORDER BY id").fetchall(),
        "partitions": conn.execute("SELECT partition_name, bounds FROM dlq_partitions ORDER BY 1").fetchall(),
        "counters": conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
            "WHERE relname LIKE 'dead_letter_events%' OR relname LIKE 'dlq_%' ORDER BY relname"
        ).fetchall(),
    }  # fmt: skip


def test_dry_run_writes_nothing_and_predicts_the_real_run(old_months: psycopg.Connection, db_url: str) -> None:
    conn = old_months
    add(conn, 9)
    add(conn, 4, created=datetime(2024, 2, 10, tzinfo=UTC))
    add(conn, 1, created=datetime(2024, 2, 11, tzinfo=UTC), resolved_at=None)
    add(conn, 2, quarantined=True, created=datetime(2024, 3, 2, tzinfo=UTC))
    add(conn, 3, created=datetime(2023, 5, 1, tzinfo=UTC))
    add(conn, 2, created=datetime.now(UTC) - timedelta(days=120), resolved_at=datetime.now(UTC) - timedelta(days=5))
    before = snapshot(conn)

    dry = run_retention(db_url, batch_size=4, dry_run=True)
    capped = run_retention(db_url, batch_size=4, max_batches=2, dry_run=True)
    rows_only = run_retention(db_url, batch_size=4, dry_run=True, drop_partitions=False)

    assert snapshot(conn) == before
    assert dry.dry_run and not dry.analyzed and dry.rows_per_second == 0 and dry.longest_batch_seconds == 0
    assert (capped.rows_deleted, capped.batches) == (8, 2)
    assert (rows_only.rows_deleted, rows_only.partitions_dropped, rows_only.partitions_kept) == (16, [], {})
    real = run_retention(db_url, batch_size=4, analyze_threshold=0)
    assert (dry.rows_deleted, dry.batches) == (real.rows_deleted, real.batches) == (16, 5)
    assert dry.partitions_dropped == real.partitions_dropped == ["dead_letter_events_p202401"]
    assert dry.partitions_kept == real.partitions_kept
    assert real.analyzed and not real.dry_run


def test_preview_reports_eligible_rows_per_partition(old_months: psycopg.Connection) -> None:
    conn = old_months
    add(conn, 3)
    add(conn, 2, created=datetime(2024, 2, 10, tzinfo=UTC))
    add(conn, 1, created=datetime(2024, 2, 11, tzinfo=UTC), resolved_at=None)
    rows = {r[0]: r[1:] for r in conn.execute("SELECT * FROM dlq_retention_preview(90)").fetchall()}
    assert rows["dead_letter_events_p202401"] == (3, 3, "would drop")
    assert rows["dead_letter_events_p202402"] == (3, 2, "kept: 1 unresolved")
    assert rows["dead_letter_events_p202403"] == (0, 0, "would drop")
    assert rows["dead_letter_events_default"] == (None, 0, "kept: default partition")
    conn.execute("SET ROLE dlq_reader")  # reporting may preview, not delete
    try:
        assert len(conn.execute("SELECT * FROM dlq_retention_preview()").fetchall()) == len(rows)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT cleanup_resolved_dlq_events_enhanced()")
    finally:
        conn.execute("RESET ROLE")


def analyze_count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute("SELECT analyze_count FROM pg_stat_user_tables WHERE relname = %s", (table,)).fetchone()[0]


def test_analyze_follows_large_changes_only(old_months: psycopg.Connection, db_url: str) -> None:
    conn = old_months
    add(conn, 3, created=datetime(2024, 2, 10, tzinfo=UTC))
    before = analyze_count(conn, "dead_letter_events_default")
    report = run_retention(db_url, analyze_threshold=10)
    assert report.rows_deleted == 3 and not report.analyzed
    assert analyze_count(conn, "dead_letter_events_default") == before

    # 2 rows by the capped batches plus 8 left in January when it is dropped: 10 rows changed
    conn.execute("SELECT dlq_ensure_partitions('2024-01-01', 0)")
    add(conn, 10)
    report = run_retention(db_url, batch_size=2, max_batches=1, analyze_threshold=10)
    assert report.rows_deleted == 2 and "dead_letter_events_p202401" in report.partitions_dropped
    assert report.analyzed
    assert analyze_count(conn, "dead_letter_events_default") == before + 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"older_than_days": -1}, "older_than_days"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 100_001}, "batch_size"),
        ({"max_batches": 0}, "max_batches"),
        ({"analyze_threshold": -1}, "analyze_threshold"),
    ],
)
def test_run_retention_rejects_nonsense_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_retention("postgresql://nobody@127.0.0.1:1/never_connected", **kwargs)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT cleanup_resolved_dlq_events_enhanced(-1, 10)",
        "SELECT cleanup_resolved_dlq_events_enhanced(90, 0)",
        "SELECT cleanup_resolved_dlq_events_enhanced(90, 100001)",
        "SELECT cleanup_resolved_dlq_events_enhanced(NULL, 10)",
        "SELECT * FROM dlq_retention_drop_partitions(-1)",
        "SELECT * FROM dlq_retention_drop_partitions(90, NULL)",
        "SELECT * FROM dlq_retention_preview(-5)",
    ],
)
def test_sql_functions_reject_nonsense_arguments(conn: psycopg.Connection, statement: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute(statement)


def test_a_large_backlog_goes_in_index_driven_batches(old_months: psycopg.Connection, db_url: str) -> None:
    conn = old_months
    conn.execute(
        """
        INSERT INTO dead_letter_events (reason, payload, created_at, resolved, resolved_at, source, source_offset)
        SELECT 'json_parse_error', jsonb_build_object('n', g),
               '2024-01-01'::timestamptz + make_interval(secs => g * 150), true,
               '2024-04-01'::timestamptz + make_interval(secs => g * 60), '/var/log/cowrie/cowrie.json', g
          FROM generate_series(1, 50000) AS g
        """
    )  # fmt: skip
    kept = add(conn, 100, resolved_at=None, created=datetime(2024, 3, 1, tzinfo=UTC))
    conn.execute("ANALYZE dead_letter_events")
    plans = claimed_plans(conn, "SELECT cleanup_resolved_dlq_events_enhanced(%s, %s)", (90, 1000))
    pick = next(p for p in plans if "SKIP LOCKED" in p)
    delete = next(p for p in plans if "DELETE FROM dead_letter_events" in p)  # not the counters' fold (random)
    # The batch is picked from the partial resolved_at index (no sort, no sequential scan), and the delete
    # reads only the partition that holds it (how is the planner's call), never the whole table in a hash join.
    assert "_resolved_at_idx on" in pick and "Seq Scan" not in pick and "Sort  " not in pick, pick
    assert set(re.findall(r"Scan(?: using \S+)? on (\S+)", delete)) == {"dead_letter_events_p202401"}, delete[:1500]
    assert "Hash" not in delete, delete[:1500]

    report = run_retention(db_url, batch_size=5000)

    assert report.rows_deleted == 50000 - 1000 and report.batches == 10
    assert report.rows_per_second > 0 and report.analyzed
    assert 0 < report.longest_batch_seconds < report.seconds  # one batch of ten, timed on its own
    assert ids(conn) == set(kept)
    assert report.partitions_dropped == ["dead_letter_events_p202401", "dead_letter_events_p202402"]
