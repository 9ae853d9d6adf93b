"""dlq_health from maintained counters (sql/functions/20_counts.sql): equal to a full scan after every kind of write."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.core.operations.redrive import redrive
from dlq_assets.core.operations.retention import run_retention
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.pool import process
from dlq_assets.devtools.generator import write_corrupted_log
from tests.core.operations.test_retention import add
from tests.reliability.conftest import VALID, insert_dead_letter

# The health numbers counted from every row (a full scan). The counters must always agree with it.
FULL_SCAN = """
SELECT count(*) FILTER (WHERE NOT resolved AND quarantined_at IS NULL),
       count(*) FILTER (WHERE resolved),
       round(avg(extract(epoch FROM (resolved_at - created_at))) FILTER (WHERE resolved), 6),
       min(created_at) FILTER (WHERE NOT resolved AND quarantined_at IS NULL),
       count(*) FILTER (WHERE retry_count > 5),
       count(*) FILTER (WHERE processing_lock IS NOT NULL AND lock_expires_at > now()),
       count(*) FILTER (WHERE processing_lock IS NOT NULL AND lock_expires_at <= now()),
       count(*) FILTER (WHERE classification = 'malicious'),
       count(*) FILTER (WHERE priority <= 3 AND NOT resolved),
       count(*) FILTER (WHERE quarantined_at IS NOT NULL),
       (SELECT count(*) FROM dlq_poison_events),
       count(*)
  FROM dead_letter_events
"""
VIEW = """
SELECT pending_events, processed_events, round(avg_resolution_time_seconds, 6), oldest_unresolved_event,
       high_retry_events, locked_events, stale_locks, malicious_events, high_priority_events, quarantined_events,
       poisoned_events, total_events
  FROM dlq_health
"""


def assert_counts_exact(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    expected = conn.execute(FULL_SCAN).fetchone()
    assert conn.execute(VIEW).fetchone() == expected
    return expected


def test_every_kind_of_write_keeps_the_counts_exact(db_url: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    assert_counts_exact(conn)
    log = tmp_path / "cowrie.json"
    write_corrupted_log(log, n_events=600, seed=4, corruption_rate=0.6)
    ingest_paths([log], url=db_url)  # inserts
    assert_counts_exact(conn)
    for i in range(6):
        insert_dead_letter(conn, {**VALID, "n": i}, classification="malicious" if i % 2 else None, priority=2)
    conn.execute("UPDATE dead_letter_events SET payload = payload || '{\"t\": 1}' WHERE id IN "
                 "(SELECT id FROM dead_letter_events WHERE NOT resolved ORDER BY id LIMIT 3)")  # fmt: skip
    process(db_url, WorkerConfig(batch_size=50, min_batch_size=10, max_batch_size=200))  # leases, outcomes
    process(db_url, WorkerConfig(batch_size=50, min_batch_size=10, max_batch_size=200, lease_mode="committed"))
    counted = assert_counts_exact(conn)
    assert counted[1] > 0 and counted[9] == 3  # some resolved, the tampered quarantined
    conn.execute("UPDATE dead_letter_events SET retry_count = 9, next_attempt_at = now() WHERE NOT resolved "
                 "AND quarantined_at IS NULL AND id % 3 = 0")  # fmt: skip
    process(db_url, WorkerConfig(batch_size=50, min_batch_size=10, max_batch_size=200))  # moves to the poison table
    assert conn.execute("SELECT count(*) FROM dlq_poison_events").fetchone()[0] > 0
    assert_counts_exact(conn)
    redrive(db_url, since=datetime(2000, 1, 1, tzinfo=UTC), limit=5)  # back from the poison table
    conn.execute("UPDATE dead_letter_events SET classification = 'malicious' WHERE id % 7 = 0")  # security_admin
    conn.execute("SELECT * FROM dlq_claim_events(20, 1)")  # a committed lease...
    conn.execute(
        "UPDATE dead_letter_events SET lock_expires_at = now() - interval '1 s' WHERE processing_lock IS NOT NULL"
    )  # fmt: skip  ...that went stale
    assert_counts_exact(conn)
    conn.execute("SELECT dlq_release_stale_leases()")
    conn.execute("UPDATE dead_letter_events SET resolved_at = now() - interval '200 days' WHERE resolved")
    run_retention(db_url, older_than_days=90)  # batched deletes
    assert_counts_exact(conn)


def test_dropping_a_months_partition_drops_its_counts(db_url: str, conn: psycopg.Connection) -> None:
    conn.execute("SELECT dlq_ensure_partitions('2024-01-01', 2)")
    add(conn, 3)  # January 2024, resolved long ago
    add(conn, 2, created=datetime(2024, 2, 10, tzinfo=UTC), resolved_at=None)  # February: keeps its partition
    add(conn, 1, created=datetime(2023, 6, 1, tzinfo=UTC))  # the default partition
    conn.execute("SELECT dlq_event_counts_fold()")
    before = assert_counts_exact(conn)
    # Rows gone by partition drop only: the batched deletes would count themselves out anyway.
    dropped = conn.execute(
        "SELECT partition_name FROM dlq_retention_drop_partitions(90) WHERE action = 'dropped'"
    ).fetchall()
    assert dropped == [("dead_letter_events_p202401",), ("dead_letter_events_p202403",)]
    after = assert_counts_exact(conn)
    assert (before[-1], after[-1]) == (6, 3)
    months = conn.execute("SELECT DISTINCT month FROM dlq_event_counts ORDER BY 1").fetchall()
    assert [m.strftime("%Y-%m") for (m,) in months] == ["2023-06", "2024-02"]


def test_truncate_and_recount(db_url: str, conn: psycopg.Connection) -> None:
    for i in range(5):
        insert_dead_letter(conn, {**VALID, "n": i})
    conn.execute("DELETE FROM dlq_event_counts")  # counts lost (say, a partition truncated by hand)
    assert conn.execute("SELECT total_events FROM dlq_health").fetchone() == (0,)
    assert conn.execute("SELECT dlq_recount_events()").fetchone() == (5,)
    assert_counts_exact(conn)
    conn.execute("TRUNCATE dead_letter_events CASCADE")
    assert conn.execute("SELECT count(*) FROM dlq_event_counts").fetchone() == (0,)
    assert_counts_exact(conn)


def test_folding_keeps_the_sums_and_leaves_one_row_per_month(conn: psycopg.Connection) -> None:
    # The counting trigger folds at random (about one statement in 50): a seeded session's random() makes the
    # statements below leave their deltas unfolded, so the fold under test has rows to fold.
    conn.execute("SELECT setseed(0.25)")
    rng = random.Random(3)
    for i in range(40):
        insert_dead_letter(conn, {**VALID, "n": i}, priority=rng.randint(1, 10))
    conn.execute("UPDATE dead_letter_events SET resolved = true, resolved_at = now() WHERE id % 2 = 0")
    rows_before = conn.execute("SELECT count(*) FROM dlq_event_counts").fetchone()[0]
    before = assert_counts_exact(conn)
    conn.execute("SELECT dlq_event_counts_fold()")
    assert conn.execute("SELECT count(*) FROM dlq_event_counts").fetchone()[0] == 1 < rows_before
    assert assert_counts_exact(conn) == before


def test_the_cli_health_reads_the_counters(db_url: str, conn: psycopg.Connection) -> None:
    from click.testing import CliRunner

    from dlq_assets.cli import main

    insert_dead_letter(conn, VALID)
    out = CliRunner().invoke(main, ["--database-url", db_url, "health", "--json"]).output
    assert json.loads(out)["pending_events"] == 1


def test_statements_that_change_no_row_add_no_counts(conn: psycopg.Connection) -> None:
    """The trigger returns before building its statement (20_counts.sql): the completion's DELETE of poisoned rows
    deletes none in most batches."""
    insert_dead_letter(conn, VALID)
    conn.execute("SELECT dlq_event_counts_fold()")
    before = conn.execute("SELECT count(*) FROM dlq_event_counts").fetchone()
    conn.execute("UPDATE dead_letter_events SET priority = 1 WHERE id < 0")
    conn.execute("DELETE FROM dead_letter_events WHERE id < 0")
    conn.execute("INSERT INTO dead_letter_events (reason, payload) SELECT 'x', '{}' WHERE false")
    assert conn.execute("SELECT count(*) FROM dlq_event_counts").fetchone() == before
    assert_counts_exact(conn)
