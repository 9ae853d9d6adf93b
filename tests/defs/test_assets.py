"""Every asset materializes against the real PostgreSQL with dg.materialize, and says what it did."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg

from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.core.migrations import discover
from dlq_assets.defs.analysis.assets import dlq_failure_patterns
from dlq_assets.defs.processing.assets import dlq_processed_batches
from dlq_assets.defs.resources import CircuitBreaker, DLQDatabase
from dlq_assets.defs.retention.assets import dlq_retention_state
from dlq_assets.defs.schema.assets import dlq_partitions, dlq_schema
from dlq_assets.defs.schema.jobs import partitions_schedule
from dlq_assets.devtools.generator import write_corrupted_log


def resources(url: str) -> dict[str, Any]:
    return {"database": DLQDatabase(url=url), "breaker": CircuitBreaker()}


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    (materialization,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in materialization.metadata.items()}


def backlog(url: str, tmp_path: Path) -> None:
    log = tmp_path / "cowrie.json"
    write_corrupted_log(log, n_events=400, seed=9, corruption_rate=0.4)
    ingest_paths([log], url=url)


def test_schema_asset_applies_the_migrations(empty_db_url: str) -> None:
    result = dg.materialize([dlq_schema], resources=resources(empty_db_url))
    assert result.success
    meta = metadata(result, "dlq_schema")
    assert meta["schema_version"] == discover()[-1].version and meta["applied_this_run"] == len(discover())
    assert all(m.name in meta["migrations"] for m in discover())


def test_partitions_asset_creates_the_month_and_months_ahead(db_url: str) -> None:
    result = dg.materialize(
        [dlq_partitions], resources=resources(db_url), partition_key="2024-03-01",
        run_config={"ops": {"dlq_partitions": {"config": {"months_ahead": 2}}}},
    )  # fmt: skip
    meta = metadata(result, "dlq_partitions")
    assert meta["partition"] == "dead_letter_events_p202403"
    assert meta["created"] == ["dead_letter_events_p202403", "dead_letter_events_p202404", "dead_letter_events_p202405"]
    assert "dead_letter_events_p202405" in meta["partitions"]


def test_the_daily_partitions_schedule_requests_the_current_month() -> None:
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2027, 2, 17, 0, 15, tzinfo=UTC))
    request = partitions_schedule(context)
    assert request.partition_key == "2027-02-01"


def test_processed_batches_asset_works_the_backlog(db_url: str, tmp_path: Path) -> None:
    backlog(db_url, tmp_path)
    result = dg.materialize(
        [dlq_processed_batches], resources=resources(db_url),
        run_config={"ops": {"dlq_processed_batches": {"config": {"batch_size": 100, "time_budget_seconds": 60}}}},
    )  # fmt: skip
    meta = metadata(result, "dlq_processed_batches")
    with psycopg.connect(db_url) as conn:
        resolved, total = conn.execute(
            "SELECT count(*) FILTER (WHERE resolved), count(*) FROM dead_letter_events"
        ).fetchone()
    assert meta["repaired"] == resolved > 0 and meta["processed"] == total
    assert meta["breaker_state"] == "closed" and meta["events_per_s"] > 0
    assert "repair:tokenizer_fix" in meta["strategies"] and "repair:control_characters" in meta["strategies"]
    with psycopg.connect(db_url) as conn:
        pending = dict(
            conn.execute(
                "SELECT reason, count(*) FROM dead_letter_events "
                "WHERE NOT resolved AND quarantined_at IS NULL GROUP BY 1"
            ).fetchall()
        )
        (rate,) = conn.execute(
            "SELECT sum(repaired_count)::float / sum(processed_count) FROM dlq_processing_metrics"
        ).fetchone()
    assert meta["backlog_pending"] == sum(pending.values()) > 0 and meta["backlog_pending_by_reason"] == pending
    assert meta["backlog_oldest_age_seconds"] >= 0 and meta["backlog_poisoned"] == meta["backlog_quarantined"] == 0
    assert meta["backlog_resolution_rate"] == round(rate, 4)


def test_failure_patterns_asset_reports_tables_and_a_chart(db_url: str, tmp_path: Path) -> None:
    backlog(db_url, tmp_path)
    result = dg.materialize([dlq_failure_patterns], resources=resources(db_url))
    meta = metadata(result, "dlq_failure_patterns")
    with psycopg.connect(db_url) as conn:
        (total,) = conn.execute("SELECT count(*) FROM dead_letter_events").fetchone()
    assert meta["total_events"] == total
    assert "json_parse_error" in meta["patterns"]
    assert meta["chart"].startswith("![") and "data:image/png;base64," in meta["chart"]


def test_retention_asset_deletes_expired_resolved_events(db_url: str, tmp_path: Path) -> None:
    backlog(db_url, tmp_path)
    dg.materialize([dlq_processed_batches], resources=resources(db_url))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE dead_letter_events SET resolved_at = now() - interval '120 days' WHERE resolved")
        (resolved,) = conn.execute("SELECT count(*) FROM dead_letter_events WHERE resolved").fetchone()
    dry = dg.materialize(
        [dlq_retention_state], resources=resources(db_url),
        run_config={"ops": {"dlq_retention_state": {"config": {"dry_run": True}}}},
    )  # fmt: skip
    assert metadata(dry, "dlq_retention_state")["rows_deleted"] == resolved
    real = dg.materialize([dlq_retention_state], resources=resources(db_url))
    meta = metadata(real, "dlq_retention_state")
    assert meta["rows_deleted"] == resolved and not meta["dry_run"]
    assert metadata(dry, "dlq_retention_state")["longest_batch_ms"] == 0 < meta["longest_batch_ms"]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE resolved").fetchone() == (0,)


def test_the_breaker_resource_reads_and_sets_state_in_postgres(db_url: str) -> None:
    breaker = CircuitBreaker(name="target", failure_threshold=3, timeout_seconds=30)
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert breaker.state(conn) == {  # not created yet: closed, with the defaults, and nothing written
            "state": "closed", "failure_count": 0, "failure_threshold": 5, "timeout_seconds": 60, "opened_at": None,
            "next_attempt_time": None,
        }  # fmt: skip
        assert conn.execute("SELECT count(*) FROM dlq_circuit_breaker_state").fetchone() == (0,)
        breaker.ensure(conn)  # as the owner: the resource's threshold and timeout are applied
        assert breaker.state(conn)["failure_threshold"] == 3
        assert breaker.set(conn, "open")["state"] == "open"
    with psycopg.connect(db_url, autocommit=True) as other:  # another process sees the same breaker
        assert breaker.state(other)["state"] == "open"
        assert breaker.set(other, "reset")["state"] == "closed"
