"""Every circuit breaker transition, in SQL, so every client sees the same breaker."""

from __future__ import annotations

import psycopg
import pytest


def acquire(conn: psycopg.Connection, name: str = "b") -> tuple[str, object]:
    return conn.execute("SELECT decision, probe FROM dlq_breaker_acquire(%s)", (name,)).fetchone()


def record(conn: psycopg.Connection, successes: int, failures: int, probe: object = None, name: str = "b") -> str:
    return conn.execute(
        "SELECT state FROM dlq_breaker_record(%s, %s, %s, %s)", (name, successes, failures, probe)
    ).fetchone()[0]


def state(conn: psycopg.Connection, name: str = "b") -> tuple:
    return conn.execute(
        "SELECT state, failure_count FROM dlq_circuit_breaker_state WHERE breaker_name = %s", (name,)
    ).fetchone()


def expire(conn: psycopg.Connection, name: str = "b") -> None:
    conn.execute(
        "UPDATE dlq_circuit_breaker_state SET next_attempt_time = now() - interval '1 s' WHERE breaker_name = %s",
        (name,),
    )


def test_closed_allows_and_opens_after_threshold_consecutive_failures(conn: psycopg.Connection) -> None:
    assert acquire(conn) == ("allow", None)
    assert state(conn) == ("closed", 0)
    for n in range(1, 5):
        assert record(conn, 0, 1) == "closed"
        assert state(conn) == ("closed", n)
    assert record(conn, 0, 1) == "open"  # the default threshold: 5
    assert acquire(conn)[0] == "deny"


def test_a_success_resets_the_consecutive_count(conn: psycopg.Connection) -> None:
    record(conn, 0, 4)
    assert record(conn, 1, 0) == "closed" and state(conn) == ("closed", 0)
    assert record(conn, 3, 2) == "closed" and state(conn) == ("closed", 2)  # only the tail run counts
    assert record(conn, 0, 3) == "open"


def test_after_the_timeout_exactly_one_probe_goes_through(conn: psycopg.Connection, db_url: str) -> None:
    conn.execute("SELECT dlq_breaker_configure('b', 2, 60)")
    record(conn, 0, 2)
    assert acquire(conn)[0] == "deny"
    expire(conn)
    decision, probe = acquire(conn)
    assert decision == "probe" and probe is not None
    assert state(conn)[0] == "half_open"
    with psycopg.connect(db_url, autocommit=True) as other:  # another process: no second probe
        assert acquire(other)[0] == "deny"
    assert acquire(conn)[0] == "deny"
    assert record(conn, 1, 0, probe) == "closed"
    assert state(conn) == ("closed", 0) and acquire(conn)[0] == "allow"


def test_a_failed_probe_opens_it_again(conn: psycopg.Connection) -> None:
    record(conn, 0, 5)
    expire(conn)
    _, probe = acquire(conn)
    assert record(conn, 0, 1, probe) == "open"
    assert acquire(conn)[0] == "deny"


def test_reports_from_others_do_not_decide_a_half_open_breaker(conn: psycopg.Connection) -> None:
    record(conn, 0, 5)
    expire(conn)
    _, probe = acquire(conn)
    assert record(conn, 5, 0) == "half_open"  # not the probe
    assert record(conn, 0, 1, probe) == "open"


def test_a_lost_probe_is_replaced_after_the_timeout(conn: psycopg.Connection) -> None:
    record(conn, 0, 5)
    expire(conn)
    _, first = acquire(conn)
    expire(conn)  # the prober crashed and never reported
    decision, second = acquire(conn)
    assert decision == "probe" and second != first
    assert record(conn, 0, 1, first) == "half_open"  # the lost probe's late report is ignored


def test_manual_open_close_reset(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT state FROM dlq_breaker_set('b', 'open')").fetchone() == ("open",)
    assert acquire(conn)[0] == "deny"
    assert conn.execute("SELECT state FROM dlq_breaker_set('b', 'close')").fetchone() == ("closed",)
    assert acquire(conn)[0] == "allow"
    record(conn, 0, 3)
    conn.execute("SELECT dlq_breaker_set('b', 'reset')")
    assert conn.execute(
        "SELECT state, failure_count, last_failure_time FROM dlq_circuit_breaker_state WHERE breaker_name = 'b'"
    ).fetchone() == ("closed", 0, None)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT dlq_breaker_set('b', 'ajar')")


def test_the_design_functions_work(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT check_circuit_breaker('seed')").fetchone() == (True,)
    for _ in range(5):
        conn.execute("SELECT record_circuit_breaker_failure('seed')")
    assert conn.execute("SELECT check_circuit_breaker('seed')").fetchone() == (False,)


def test_breakers_are_independent_by_name(conn: psycopg.Connection) -> None:
    record(conn, 0, 5, name="target")
    assert acquire(conn, "target")[0] == "deny"
    assert acquire(conn, "other")[0] == "allow"
