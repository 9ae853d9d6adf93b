"""The hand controls: setting a breaker and releasing stale leases, each committed on an autocommit connection."""

from __future__ import annotations

import psycopg
import pytest

from dlq_assets.core.operations.control import BREAKER_ACTIONS, release_stale_leases, set_breaker
from dlq_assets.core.operations.inspect import breaker_status, list_leases
from tests.reliability.conftest import VALID, insert_dead_letter


def test_set_breaker_opens_closes_and_resets(db_url: str, conn: psycopg.Connection) -> None:
    assert BREAKER_ACTIONS == ("open", "close", "reset")
    set_breaker(conn, "manual", "open")
    with psycopg.connect(db_url) as other:  # committed: another session sees it
        state = breaker_status(other, "manual")
    assert state is not None and state["state"] == "open" and state["next_attempt_time"] is not None
    conn.execute("UPDATE dlq_circuit_breaker_state SET failure_count = 3 WHERE breaker_name = 'manual'")
    set_breaker(conn, "manual", "close")
    state = breaker_status(conn, "manual")
    assert state is not None and (state["state"], state["failure_count"], state["opened_at"]) == ("closed", 0, None)
    set_breaker(conn, "manual", "reset")
    state = breaker_status(conn, "manual")
    assert state is not None and (state["state"], state["last_failure_time"]) == ("closed", None)


def test_set_breaker_refuses_an_unknown_action_and_a_bad_name(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="open, close or reset"):
        set_breaker(conn, "manual", "status")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="breaker name"):
        set_breaker(conn, "x" * 65, "reset")
    assert breaker_status(conn, "manual") is None


def test_release_stale_leases_gives_expired_leases_back_as_failed_attempts(conn: psycopg.Connection) -> None:
    for i in range(4):
        insert_dead_letter(conn, {**VALID, "n": i})
    assert release_stale_leases(conn) == 0
    conn.execute("SELECT * FROM dlq_claim_events(3, 60)")
    assert release_stale_leases(conn) == 0  # leases still valid stay held
    conn.execute("UPDATE dead_letter_events SET lock_expires_at = now() - interval '1 s' "
                 "WHERE processing_lock IS NOT NULL")  # fmt: skip
    assert release_stale_leases(conn) == 3
    assert list_leases(conn) == []
    retries = conn.execute("SELECT retry_count FROM dead_letter_events ORDER BY retry_count").fetchall()
    assert retries == [(0,), (1,), (1,), (1,)]  # each released event charged one attempt
