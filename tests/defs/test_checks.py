"""The health checks, run for real by Dagster against real PostgreSQL: healthy passes, each seeded problem fails
exactly its own check with its severity, and a failed blocking ERROR check stops downstream work."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg
import pytest

from dlq_assets.defs.alerts.checks import health_checks
from dlq_assets.defs.processing.assets import dlq_processed_batches
from dlq_assets.defs.resources import DLQDatabase

ASSET = dlq_processed_batches.key
ERROR, WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


@dg.asset(name="dlq_processed_batches")
def processed_batches() -> None:
    """Stands in for the real asset: the checks judge the database, not its output."""


@dg.asset(deps=[ASSET])
def downstream() -> None:
    """Stands in for work that must not run on an unhealthy DLQ."""


def run(db_url: str, *assets: dg.AssetsDefinition, run_config: Any = None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [processed_batches, *assets, *health_checks],
        resources={"database": DLQDatabase(url=db_url)},
        run_config=run_config,
        raise_on_error=False,
    )


def evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def dead_letter(conn: psycopg.Connection, payload: Any = None, **columns: Any) -> int:
    values = {"reason": "target_unavailable", "payload": json.dumps(payload or {"eventid": "x"}), **columns}
    names, marks = ", ".join(values), ", ".join(["%s"] * len(values))
    sql = f"INSERT INTO dead_letter_events ({names}) VALUES ({marks}) RETURNING id"
    return conn.execute(sql, list(values.values())).fetchone()[0]


def batch_metrics(conn: psycopg.Connection, processed: int, resolved: int, minutes_ago: int = 1) -> None:
    conn.execute(
        """
        INSERT INTO dlq_processing_metrics (processing_session_id, processing_method, batch_size, processed_count,
               repaired_count, failed_count, skipped_count, processing_duration_ms, started_at, completed_at)
        VALUES ('s', 'python', %(n)s, %(n)s, %(r)s, %(n)s - %(r)s, 0, 10,
                now() - make_interval(mins => %(m)s), now() - make_interval(mins => %(m)s))
        """,
        {"n": processed, "r": resolved, "m": minutes_ago},
    )


def quarantine_tampered(conn: psycopg.Connection) -> None:
    """Through the state machine, the way a worker that finds a checksum mismatch does it."""
    dead_letter(conn, {"eventid": "tampered"})
    (row,) = conn.execute("SELECT id, processing_lock FROM dlq_claim_events(1)").fetchall()
    conn.execute("SELECT dlq_complete_batch(%s, ARRAY[%s]::bigint[], ARRAY['quarantined'])", (row[1], row[0]))


SEEDS = {
    "high_retry_events": lambda c: dead_letter(c, retry_count=6),
    "stale_locks": lambda c: c.execute(
        "UPDATE dead_letter_events SET processing_lock = gen_random_uuid(), lock_expires_at = now() - interval '1 min'"
        " WHERE id = %s",
        (dead_letter(c),),
    ),
    "backlog_age": lambda c: dead_letter(c, created_at=ago(hours=7)),
    "breaker_open": lambda c: c.execute("SELECT dlq_breaker_set('x', 'open')"),
    "tampered_events": quarantine_tampered,
    "malicious_events": lambda c: dead_letter(c, classification="malicious", priority=3),
    "success_rate": lambda c: batch_metrics(c, processed=100, resolved=5),
}
SEVERITY = {
    "high_retry_events": WARN,
    "stale_locks": ERROR,
    "backlog_age": WARN,
    "breaker_open": ERROR,
    "tampered_events": ERROR,
    "malicious_events": WARN,
    "success_rate": WARN,
}


def test_the_checks_are_the_contracted_ones() -> None:
    specs = {spec.name: spec for check in health_checks for spec in check.check_specs}
    assert set(specs) == set(SEVERITY)
    assert {spec.asset_key for spec in specs.values()} == {ASSET}
    assert {name for name, spec in specs.items() if spec.blocking} == {n for n, s in SEVERITY.items() if s == ERROR}


def test_an_empty_dlq_passes_every_check(db_url: str) -> None:
    result = run(db_url)
    assert result.success
    found = evaluations(result)
    assert set(found) == set(SEVERITY) and all(e.passed for e in found.values())
    assert "nothing to judge" in found["success_rate"].description
    assert found["backlog_age"].description == "no pending events"


def test_a_dlq_with_everything_resolved_passes_every_check(db_url: str, conn: psycopg.Connection) -> None:
    for i in range(5):
        dead_letter(conn, {"eventid": f"e{i}"}, resolved=True, resolved_at=ago(), created_at=ago(days=2))
    batch_metrics(conn, processed=5, resolved=5)
    batch_metrics(conn, processed=100, resolved=0, minutes_ago=600)  # outside the window
    result = run(db_url)
    found = evaluations(result)
    assert result.success and all(e.passed for e in found.values())
    rate = found["success_rate"].metadata
    assert rate["value"].value == 1.0 and rate["recent_batches"].value == 1


@pytest.mark.parametrize("check", sorted(SEEDS))
def test_each_problem_fails_its_own_check_with_its_severity(db_url: str, conn: psycopg.Connection, check: str) -> None:
    SEEDS[check](conn)
    result = run(db_url)
    found = evaluations(result)
    assert set(found) == set(SEVERITY)
    assert {name for name, e in found.items() if not e.passed} == {check}
    failed = found[check]
    assert failed.severity == SEVERITY[check]
    assert failed.blocking is (SEVERITY[check] == ERROR)
    assert result.success is (SEVERITY[check] == WARN)  # a failed blocking ERROR check fails its step
    assert failed.metadata["value"].value > failed.metadata["threshold"].value or check == "success_rate"
    explanation = failed.metadata["explanation"].value
    assert failed.description in explanation and len(explanation) > len(failed.description) + 50


def test_thresholds_come_from_run_config(db_url: str, conn: psycopg.Connection) -> None:
    dead_letter(conn, retry_count=6)
    dead_letter(conn, {"eventid": "old"}, created_at=ago(hours=7))
    config = {"high_retry_events": 1, "backlog_age_seconds": 86400.0}
    ops = {f"dlq_processed_batches_{name}": {"config": config} for name in ("high_retry_events", "backlog_age")}
    found = evaluations(run(db_url, run_config={"ops": ops}))
    assert found["high_retry_events"].passed and found["high_retry_events"].metadata["threshold"].value == 1
    assert found["backlog_age"].passed and found["backlog_age"].metadata["threshold"].value == 86400.0


def test_an_open_breaker_reports_which_one(db_url: str, conn: psycopg.Connection) -> None:
    conn.execute("SELECT dlq_breaker_set('target_a', 'open')")
    conn.execute("SELECT dlq_breaker_set('target_b', 'close')")
    failed = evaluations(run(db_url))["breaker_open"]
    assert failed.metadata["open_breakers"].value == {"target_a": "open"}
    assert failed.description == "target_a is open"


def test_a_failed_blocking_check_stops_downstream_work(db_url: str, conn: psycopg.Connection) -> None:
    conn.execute("SELECT dlq_breaker_set('x', 'open')")
    result = run(db_url, downstream)
    assert not result.success
    assert result.asset_materializations_for_node("dlq_processed_batches")
    assert result.asset_materializations_for_node("downstream") == []
    assert "downstream" not in {e.step_key for e in result.get_step_success_events()}


def test_a_failed_warn_check_lets_downstream_work_run(db_url: str, conn: psycopg.Connection) -> None:
    dead_letter(conn, retry_count=6)
    result = run(db_url, downstream)
    assert result.success and not evaluations(result)["high_retry_events"].passed
    assert result.asset_materializations_for_node("downstream")
