"""The shared state machine: complete, backoff, attempt cap, poison, quarantine, fencing, stale leases."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import psycopg
import pytest

from tests.core.processing.test_claim import fill_backlog


def claim(conn: psycopg.Connection, n: int = 10, lease_seconds: int = 600) -> tuple[uuid.UUID, list[int]]:
    rows = conn.execute("SELECT id, processing_lock FROM dlq_claim_events(%s, %s)", (n, lease_seconds)).fetchall()
    assert rows
    return rows[0][1], sorted(r[0] for r in rows)


def complete(
    conn: psycopg.Connection,
    lease: uuid.UUID,
    ids: list[int],
    outcome: str,
    error_class: str | None = None,
    method: str | None = None,
) -> dict[int, str]:
    n = len(ids)
    rows = conn.execute(
        "SELECT event_id, final_state FROM dlq_complete_batch(%s, %s, %s, %s, %s, %s)",
        (lease, ids, [outcome] * n, [method] * n, [error_class] * n, [f"{outcome} for test"] * n),
    ).fetchall()
    return dict(rows)


def event(conn: psycopg.Connection, event_id: int) -> dict:
    cur = conn.execute("SELECT * FROM dead_letter_events WHERE id = %s", (event_id,))
    row = cur.fetchone()
    return dict(zip([c.name for c in cur.description], row, strict=True)) if row else {}


@pytest.fixture
def backlog(conn: psycopg.Connection) -> psycopg.Connection:
    fill_backlog(conn, 30)
    return conn


def test_resolved_events_record_method_and_time_and_release_the_lease(backlog: psycopg.Connection) -> None:
    lease, ids = claim(backlog, 5)
    assert complete(backlog, lease, ids, "resolved", method="repair:tokenizer_fix") == dict.fromkeys(ids, "resolved")
    row = event(backlog, ids[0])
    assert row["resolved"] and row["resolved_at"] is not None
    assert row["resolution_method"] == "repair:tokenizer_fix"
    assert row["processing_lock"] is None and row["lock_expires_at"] is None


def test_failure_schedules_a_retry_with_exponential_backoff_and_history(backlog: psycopg.Connection) -> None:
    backlog.execute("UPDATE dlq_retry_policies SET jitter = 0 WHERE reason IS NULL AND error_class IS NULL")
    lease, ids = claim(backlog, 1)
    delays = []
    for attempt in (1, 2, 3, 4):
        assert complete(backlog, lease, ids, "failed", error_class="target_unavailable") == {ids[0]: "retry_scheduled"}
        row = event(backlog, ids[0])
        assert row["retry_count"] == attempt
        assert row["error_history"][-1]["attempt"] == attempt
        assert row["error_history"][-1]["error_class"] == "target_unavailable"
        assert row["error_history"][-1]["message"] == "failed for test"
        (delay,) = backlog.execute(
            "SELECT extract(epoch FROM next_attempt_at - last_processed_at) FROM dead_letter_events WHERE id = %s",
            ids,
        ).fetchone()
        delays.append(round(float(delay)))
        # not claimable until due; make it due and take it again
        assert backlog.execute("SELECT count(*) FROM dlq_claim_events(100) WHERE id = %s", ids).fetchone() == (0,)
        backlog.execute("UPDATE dead_letter_events SET next_attempt_at = now() WHERE id = %s", ids)
        lease = backlog.execute("SELECT processing_lock FROM dlq_claim_events(1, 600, 1)").fetchone()[0]
        backlog.execute("UPDATE dead_letter_events SET processing_lock = %s WHERE id = %s", (lease, ids[0]))
    assert delays == [30, 60, 120, 240]


def test_a_backoff_counts_from_the_failure_not_from_the_claim(backlog: psycopg.Connection) -> None:
    """A batch's transaction starts at its claim and completes its failures later: counted from the transaction's
    start (now()), a long batch spends the backoff before the retry is scheduled, and in due-time order the retry
    goes before events that became due while the batch ran."""
    backlog.execute(
        "UPDATE dlq_retry_policies SET jitter = 0, backoff_base_seconds = 5 "
        "WHERE reason IS NULL AND error_class IS NULL"
    )
    with backlog.transaction():
        lease, ids = claim(backlog, 1)
        backlog.execute("SELECT pg_sleep(1.5)")
        assert complete(backlog, lease, ids, "failed", error_class="target_unavailable") == {ids[0]: "retry_scheduled"}
        (ahead,) = backlog.execute(
            "SELECT extract(epoch FROM next_attempt_at - now()) FROM dead_letter_events WHERE id = %s", ids
        ).fetchone()
    assert float(ahead) >= 6.4  # 5 s from the failure, 1.5 s after the transaction began


def test_backoff_is_capped_and_jittered(conn: psycopg.Connection) -> None:
    values = [
        float(v) for (v,) in conn.execute("SELECT dlq_backoff_seconds(30, 30, 3600, 0.2) FROM generate_series(1, 200)")
    ]
    assert all(3600 * 0.8 <= v <= 3600 * 1.2 for v in values)
    assert len({round(v, 3) for v in values}) > 100  # jitter spreads retries
    (exact,) = conn.execute("SELECT dlq_backoff_seconds(3, 10, 1000, 0)").fetchone()
    assert float(exact) == 40


def test_attempt_cap_moves_the_event_to_the_poison_table_with_its_history(backlog: psycopg.Connection) -> None:
    backlog.execute("UPDATE dlq_retry_policies SET max_attempts = 3 WHERE reason IS NULL AND error_class IS NULL")
    lease, ids = claim(backlog, 1)
    for expected in ("retry_scheduled", "retry_scheduled", "poisoned"):
        assert complete(backlog, lease, ids, "failed", error_class="boom") == {ids[0]: expected}
        if expected != "poisoned":
            backlog.execute("UPDATE dead_letter_events SET processing_lock = %s, lock_expires_at = now() + "
                            "interval '1 minute', next_attempt_at = now() WHERE id = %s", (lease, ids[0]))  # fmt: skip
    assert event(backlog, ids[0]) == {}
    poison = backlog.execute(
        "SELECT retry_count, jsonb_array_length(error_history), poison_reason, last_error->>'error_class', "
        "idempotency_key IS NOT NULL, payload IS NOT NULL FROM dlq_poison_events WHERE id = %s",
        ids,
    ).fetchone()
    assert poison == (3, 3, "max_attempts", "boom", True, True)
    assert backlog.execute("SELECT poisoned_events FROM dlq_health").fetchone() == (1,)


def test_a_non_retryable_error_class_poisons_at_once(backlog: psycopg.Connection) -> None:
    lease, ids = claim(backlog, 2)
    assert complete(backlog, lease, ids, "failed", error_class="handler_missing") == dict.fromkeys(ids, "poisoned")
    reasons = backlog.execute("SELECT DISTINCT poison_reason FROM dlq_poison_events").fetchall()
    assert reasons == [("non_retryable:handler_missing",)]


def test_policy_is_configurable_per_reason_and_error_class(backlog: psycopg.Connection) -> None:
    backlog.execute(
        "INSERT INTO dlq_retry_policies (reason, error_class, max_attempts, retryable) VALUES "
        "('json_parse_error', 'flaky', 1, true), ('json_parse_error', NULL, 7, true)"
    )
    policy = "SELECT max_attempts FROM dlq_retry_policy(%s, %s)"
    assert backlog.execute(policy, ("json_parse_error", "flaky")).fetchone() == (1,)
    assert backlog.execute(policy, ("json_parse_error", "other")).fetchone() == (7,)
    assert backlog.execute(policy, ("validation_failed", "lease_expired")).fetchone() == (10,)
    assert backlog.execute(policy, ("validation_failed", "other")).fetchone() == (10,)
    lease, ids = claim(backlog, 1)
    assert complete(backlog, lease, ids, "failed", error_class="flaky") == {ids[0]: "poisoned"}


def test_checksum_mismatch_quarantines_for_good(backlog: psycopg.Connection) -> None:
    lease, ids = claim(backlog, 1)
    assert complete(backlog, lease, ids, "quarantined") == {ids[0]: "quarantined"}
    row = event(backlog, ids[0])
    assert (row["classification"], row["reason"]) == ("tampered", "checksum_mismatch")
    assert row["metadata_json"]["original_reason"] == "json_parse_error"
    assert row["quarantined_at"] is not None and not row["resolved"]
    backlog.execute("UPDATE dead_letter_events SET next_attempt_at = now() - interval '1 day' WHERE id = %s", ids)
    claimed = backlog.execute("SELECT id FROM dlq_claim_events(1000)").fetchall()
    assert ids[0] not in {r[0] for r in claimed}  # never reprocessed automatically
    assert backlog.execute("SELECT quarantined_events FROM dlq_health").fetchone() == (1,)


def test_completion_is_fenced_by_the_lease(backlog: psycopg.Connection) -> None:
    old_lease, ids = claim(backlog, 3, lease_seconds=1)
    backlog.execute("UPDATE dead_letter_events SET lock_expires_at = now() - interval '1 s' WHERE id = ANY(%s)", (ids,))
    new_lease = backlog.execute("SELECT processing_lock FROM dlq_claim_events(3) LIMIT 1").fetchone()[0]
    assert new_lease != old_lease
    # the slow worker finishes late: its outcome changes nothing
    assert complete(backlog, old_lease, ids, "resolved") == dict.fromkeys(ids, "not_owned")
    assert not any(event(backlog, i)["resolved"] for i in ids)
    assert complete(backlog, new_lease, ids, "resolved") == dict.fromkeys(ids, "resolved")


def test_released_events_go_back_untouched(backlog: psycopg.Connection) -> None:
    lease, ids = claim(backlog, 2)
    assert complete(backlog, lease, ids, "released") == dict.fromkeys(ids, "released")
    row = event(backlog, ids[0])
    assert row["retry_count"] == 0 and row["processing_lock"] is None and row["error_history"] == []


def test_heartbeat_extends_a_live_lease_and_reports_a_lost_one(backlog: psycopg.Connection) -> None:
    lease, ids = claim(backlog, 4, lease_seconds=5)
    assert backlog.execute("SELECT dlq_heartbeat(%s, 900)", (lease,)).fetchone() == (4,)
    (left,) = backlog.execute(
        "SELECT min(lock_expires_at) - now() FROM dead_letter_events WHERE id = ANY(%s)", (ids,)
    ).fetchone()
    assert left > timedelta(seconds=800)
    assert backlog.execute("SELECT dlq_heartbeat(%s, 900)", (uuid.uuid4(),)).fetchone() == (0,)


def test_expired_leases_count_as_an_attempt_and_are_claimed_again(backlog: psycopg.Connection) -> None:
    _lease, ids = claim(backlog, 3)
    backlog.execute("UPDATE dead_letter_events SET lock_expires_at = now() - interval '1 s' WHERE id = ANY(%s)", (ids,))
    assert backlog.execute("SELECT stale_locks FROM dlq_health").fetchone() == (3,)
    assert backlog.execute("SELECT dlq_release_stale_leases()").fetchone() == (3,)
    row = event(backlog, ids[0])
    assert row["retry_count"] == 1 and row["error_history"][-1]["error_class"] == "lease_expired"
    assert row["processing_lock"] is None
    again = {r[0] for r in backlog.execute("SELECT id FROM dlq_claim_events(1000)").fetchall()}
    assert set(ids) <= again  # retried at once (lease_expired has no backoff)


def test_a_worker_killing_event_is_poisoned_after_the_cap(backlog: psycopg.Connection) -> None:
    backlog.execute("UPDATE dlq_retry_policies SET max_attempts = 3 WHERE error_class = 'lease_expired'")
    target = backlog.execute(
        "SELECT id FROM dead_letter_events WHERE NOT resolved ORDER BY priority, next_attempt_at, id LIMIT 1"
    ).fetchone()[0]
    # Alone in its priority: a released event queues behind those due before it, and this one must come back.
    backlog.execute("UPDATE dead_letter_events SET priority = 10 WHERE id <> %s", (target,))
    for _ in range(3):
        claimed = {r[0] for r in backlog.execute("SELECT id FROM dlq_claim_events(1, 1)").fetchall()}
        assert claimed == {target}
        backlog.execute(
            "UPDATE dead_letter_events SET lock_expires_at = now() - interval '1 s' WHERE id = %s", (target,)
        )
    backlog.execute("SELECT dlq_release_stale_leases()")
    assert backlog.execute("SELECT poison_reason FROM dlq_poison_events WHERE id = %s", (target,)).fetchone() == (
        "max_attempts",
    )


def test_record_dlq_processing_failure_is_the_design_entry_point(backlog: psycopg.Connection) -> None:
    (event_id,) = backlog.execute("SELECT min(id) FROM dead_letter_events WHERE NOT resolved").fetchone()
    assert backlog.execute(
        "SELECT record_dlq_processing_failure(%s, 'handler_crash', 'boom')", (event_id,)
    ).fetchone() == ("retry_scheduled",)
    assert event(backlog, event_id)["error_history"][-1]["message"] == "boom"
    with pytest.raises(psycopg.errors.NoDataFound):
        backlog.execute("SELECT record_dlq_processing_failure(-1, 'x', 'y')")


@pytest.mark.parametrize(
    ("ids", "outcomes", "message"),
    [([1, 2], ["resolved"], "differ in length"), ([1], ["done"], "must be resolved, failed")],
)
def test_complete_rejects_malformed_input(
    conn: psycopg.Connection, ids: list[int], outcomes: list[str], message: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        conn.execute("SELECT * FROM dlq_complete_batch(gen_random_uuid(), %s, %s)", (ids, outcomes))


def test_history_is_valid_json_arrays(backlog: psycopg.Connection) -> None:
    lease, ids = claim(backlog, 2)
    complete(backlog, lease, ids, "failed", error_class="x")
    for (history,) in backlog.execute("SELECT error_history FROM dead_letter_events WHERE id = ANY(%s)", (ids,)):
        assert isinstance(json.loads(json.dumps(history)), list)
