"""process_dlq_events_enhanced: the whole batch in the database, with the Cowrie rules mirrored in SQL."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlq_assets.core import jsonutil
from dlq_assets.core.cowrie import REQUIRED_ATTRIBUTES, event_ids, validate_event
from dlq_assets.devtools.embedded import _bin
from dlq_assets.devtools.generator import generate_events
from tests.conftest import SHARED_REFERENCE, TEST_DATA

VALID = {
    "eventid": "cowrie.login.failed",
    "timestamp": "2024-01-15T10:30:00.123456Z",
    "session": "5d77535d8ac4",
    "src_ip": "193.201.224.214",
    "username": "root",
    "password": "admin",
}


def sql_errors(conn: psycopg.Connection, event: Any) -> list[str]:
    text = jsonutil.canonical_json(event)
    return conn.execute("SELECT dlq_cowrie_validation_errors(%s::jsonb)", (text,)).fetchone()[0]


def codes(errors: Any) -> list[str]:
    return [e.split(":")[0] for e in errors]


def assert_agree(conn: psycopg.Connection, event: Any) -> None:
    python = validate_event(event)
    sql = sql_errors(conn, event)
    assert (python.valid, codes(python.errors)) == (not sql, codes(sql)), event


def test_the_sql_catalogue_is_the_python_catalogue(conn: psycopg.Connection) -> None:
    rows = dict(conn.execute("SELECT eventid, required_attributes FROM dlq_cowrie_event_ids").fetchall())
    assert set(rows) == set(event_ids())
    assert {k: tuple(v) for k, v in rows.items() if v} == REQUIRED_ATTRIBUTES


def test_sql_and_python_agree_on_generated_and_reference_events(conn: psycopg.Connection) -> None:
    for event in generate_events(1500, seed=4):
        assert_agree(conn, jsonutil.loads(json.dumps(event)))
    path = SHARED_REFERENCE / "cowrieprocessor_repair_cases.jsonl"
    if not path.exists():
        path = TEST_DATA / "cowrieprocessor_repair_cases.jsonl"
    cases = [json.loads(line) for line in path.read_text().splitlines()]
    validate_cases = [c for c in cases if c["kind"] == "validate_event"]
    assert len(validate_cases) == 12
    for case in validate_cases:
        assert_agree(conn, jsonutil.loads(json.dumps(case["input"])))


TRICKY = {
    "timestamp": ["2024-01-15T10:30:00Z", "2024-01-15T24:00:00Z", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z",
                  "2024-02-29T00:00:00+05:30", "2024-01-15T10:30:00+0530", "2024-01-15T10:30:00+24:00",
                  "2024-01-15T10:30:00.1234567Z", "2024-01-15 10:30:00Z", "2024-01-15T10:30:60Z", 5, None],
    "src_ip": ["1.2.3.4", "01.2.3.4", "1.2.3", "10.0.0.1/24", "::1", "2001:db8::1", "fe80::1%eth0", " 1.2.3.4",
               "256.1.1.1", "::ffff:1.2.3.4", "2001:db8::/32", "", 12345],
    "src_port": [22, Decimal("22.0"), Decimal("22.5"), -1, 65535, 65536, "22", True, None],
    "session": ["5d77535d8ac4", "5D77535D8AC4", "abc12345", "ABC12345", "abc1234", "5d77535d8ac4 ", 12345678],
    "shasum": ["a" * 64, "A" * 64, "a" * 63, "g" * 64, None],
    "username": ["root", 5, None, ["a"]],
}  # fmt: skip


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in TRICKY.items() for v in values])
def test_sql_and_python_agree_on_tricky_values(conn: psycopg.Connection, field: str, value: Any) -> None:
    assert_agree(conn, {**VALID, field: value})


def test_sql_and_python_agree_on_event_shapes(conn: psycopg.Connection) -> None:
    for eventid in sorted(event_ids()):
        assert_agree(conn, {**VALID, "eventid": eventid})
    for missing in ("eventid", "timestamp", "session"):
        assert_agree(conn, {k: v for k, v in VALID.items() if k != missing})
    for value in ([], "x", 3, None, {"eventid": "cowrie.abuseipdb.started", "timestamp": VALID["timestamp"]}):
        assert_agree(conn, value)
    assert_agree(conn, {**VALID, "eventid": "cowrie.direct-tcpip.request", "dst_ip": "ya.ru"})
    assert_agree(conn, {**VALID, "eventid": "cowrie.direct-tcpip.request", "dst_ip": "  "})


values = st.one_of(
    st.text(max_size=20),
    st.integers(-5, 70000),
    st.sampled_from(["2024-01-15T10:30:00Z", "5d77535d8ac4", "1.2.3.4", "::1", "a" * 64]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted({*VALID, "src_port", "dst_ip", "dst_port", "shasum", "input"})), values))
def test_sql_and_python_agree_on_random_events(conn: psycopg.Connection, fields: dict[str, Any]) -> None:
    event = {**VALID, **fields}
    if "\x00" in json.dumps(event, ensure_ascii=False).replace("\\u0000", "\x00"):
        return  # jsonb cannot hold NUL: such events never reach SQL
    assert_agree(conn, jsonutil.loads(json.dumps(event)))


def insert(conn: psycopg.Connection, payload: Any, **extra: Any) -> int:
    values = {"reason": "target_unavailable", "payload": json.dumps(payload), **extra}
    names, marks = ", ".join(values), ", ".join(["%s"] * len(values))
    return conn.execute(
        f"INSERT INTO dead_letter_events ({names}) VALUES ({marks}) RETURNING id", list(values.values())
    ).fetchone()[0]


def run(conn: psycopg.Connection, *args: Any) -> dict[str, Any]:
    cur = conn.execute(f"SELECT * FROM process_dlq_events_enhanced({', '.join(['%s'] * len(args))})", args)
    return dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))


def test_transient_failures_are_replayed_in_the_database(conn: psycopg.Connection) -> None:
    good = [insert(conn, {**VALID, "n": i}, source="/log", source_inode="9", source_offset=i * 100) for i in range(5)]
    bad = insert(conn, {**VALID, "session": "nope"})
    raw = insert(conn, {"raw_text": "{broken"}, metadata_json=json.dumps({"payload_form": "raw_text"}))
    result = run(conn, 100)
    assert result == {"processed": 6, "repaired": 5, "failed": 1, "skipped": 0, "quarantined": 0, "poisoned": 0,
                      "circuit_breaker_triggered": False, "duration_ms": result["duration_ms"]}  # fmt: skip
    rows = conn.execute("SELECT dlq_event_id, source_offset, repair_strategy FROM raw_events ORDER BY 1").fetchall()
    assert rows == [(g, i * 100, "replay:sql") for i, g in enumerate(good)]
    state = conn.execute(
        "SELECT retry_count, next_attempt_at > now(), error_history -> -1 ->> 'error_class' FROM dead_letter_events "
        "WHERE id = %s",
        (bad,),
    ).fetchone()
    assert state == (1, True, "invalid_event")
    untouched = conn.execute("SELECT processing_attempts FROM dead_letter_events WHERE id = %s", (raw,)).fetchone()
    assert untouched == ([],)  # raw text needs repair: left for the Python worker
    metrics = conn.execute(
        "SELECT processing_method, batch_size, repaired_count, failed_count FROM dlq_processing_metrics"
    ).fetchone()
    assert metrics == ("stored_procedure", 6, 5, 1)


def test_replay_is_idempotent_on_the_target(conn: psycopg.Connection) -> None:
    first = insert(conn, VALID, source="/log", source_inode="9", source_offset=0)
    run(conn, 10)
    insert(conn, VALID, source="/log", source_inode="9", source_offset=0, idempotency_key="again")
    assert run(conn, 10)["repaired"] == 1
    assert conn.execute("SELECT count(*), min(dlq_event_id) FROM raw_events").fetchone() == (1, first)


def test_a_target_that_drops_a_row_silently_leaves_its_event_failed_not_resolved(conn: psycopg.Connection) -> None:
    kept = [insert(conn, {**VALID, "n": i}, source="/log", source_inode="9", source_offset=i * 100) for i in range(3)]
    dropped = insert(conn, {**VALID, "eventid": "cowrie.login.success"}, source="/log", source_offset=900)
    no_source = insert(conn, {**VALID, "eventid": "cowrie.login.success", "n": 9})
    conn.execute(
        """CREATE FUNCTION drop_successes() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.eventid = 'cowrie.login.success' THEN RETURN NULL; END IF; RETURN NEW; END $$;
           CREATE TRIGGER drop_successes BEFORE INSERT ON raw_events FOR EACH ROW EXECUTE FUNCTION drop_successes()"""
    )
    conn.execute(  # and one that removes a row when its transaction commits
        """CREATE FUNCTION drop_late() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
           BEGIN IF NEW.source_offset = 200 THEN DELETE FROM raw_events WHERE id = NEW.id; END IF; RETURN NULL; END $$;
           CREATE CONSTRAINT TRIGGER drop_late AFTER INSERT ON raw_events DEFERRABLE INITIALLY DEFERRED
               FOR EACH ROW EXECUTE FUNCTION drop_late()"""
    )
    late = kept.pop()
    result = run(conn, 100)
    assert (result["repaired"], result["failed"]) == (2, 3)
    states = conn.execute(
        "SELECT id, resolved, retry_count, error_history -> -1 ->> 'error_class' FROM dead_letter_events "
        "WHERE id = ANY(%s) ORDER BY id",
        ([late, dropped, no_source],),
    ).fetchall()
    assert states == [(i, False, 1, "target_write_failed") for i in (late, dropped, no_source)]
    assert conn.execute("SELECT array_agg(dlq_event_id ORDER BY dlq_event_id) FROM raw_events").fetchone() == (kept,)
    assert conn.execute("SELECT failure_count FROM dlq_circuit_breaker_state").fetchone() == (3,)


def test_another_events_row_at_the_position_leaves_the_event_failed(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO raw_events (source, source_inode, source_offset, eventid, payload) "
        "VALUES ('/log', '9', 100, 'cowrie.login.failed', %s)",
        (json.dumps({**VALID, "n": 0}),),
    )
    other = insert(conn, {**VALID, "n": 1}, source="/log", source_inode="9", source_offset=100)
    result = run(conn, 10)
    assert (result["repaired"], result["failed"]) == (0, 1)
    row = conn.execute(
        "SELECT resolved, retry_count, error_history -> -1 ->> 'error_class' FROM dead_letter_events WHERE id = %s",
        (other,),
    ).fetchone()
    assert row == (False, 1, "target_write_failed")


def test_tampering_is_quarantined_and_filters_apply(conn: psycopg.Connection) -> None:
    tampered = insert(conn, VALID, priority=1)
    conn.execute("UPDATE dead_letter_events SET payload = payload || '{\"x\": 1}' WHERE id = %s", (tampered,))
    insert(conn, {**VALID, "n": 1}, priority=5)
    insert(conn, {**VALID, "n": 2}, priority=1, reason="timeout")
    result = run(conn, 100, "target_unavailable", 3)
    assert (result["quarantined"], result["repaired"]) == (1, 0)
    assert run(conn, 100)["repaired"] == 2


def test_an_open_breaker_returns_early_with_a_metrics_row(conn: psycopg.Connection) -> None:
    insert(conn, VALID)
    conn.execute("SELECT dlq_breaker_set('dlq_processing', 'open')")
    result = run(conn, 100)
    assert result["circuit_breaker_triggered"] and result["processed"] == 0
    assert conn.execute(
        "SELECT batch_size, circuit_breaker_triggered, processing_method FROM dlq_processing_metrics"
    ).fetchone() == (0, True, "stored_procedure")


def test_a_breaker_opened_mid_batch_by_another_worker_releases_the_rest(conn: psycopg.Connection, db_url: str) -> None:
    for i in range(5):
        insert(conn, {**VALID, "n": i})
    conn.execute("SELECT dlq_breaker_ensure('dlq_processing')")

    def open_it_later() -> None:
        time.sleep(1.5)  # while the batch pauses after its second event (pauses of 1 s after each event)
        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute("SELECT dlq_breaker_set('dlq_processing', 'open')")

    opener = threading.Thread(target=open_it_later)
    opener.start()
    result = run(conn, 100, None, None, "dlq_processing", 1, 1.0)
    opener.join()
    assert (result["repaired"], result["skipped"], result["circuit_breaker_triggered"]) == (2, 3, True)
    assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE processing_lock IS NOT NULL").fetchone() == (0,)


def test_half_open_lets_exactly_one_event_through(conn: psycopg.Connection) -> None:
    for i in range(4):
        insert(conn, {**VALID, "n": i})
    conn.execute("SELECT dlq_breaker_set('dlq_processing', 'open')")
    conn.execute("UPDATE dlq_circuit_breaker_state SET next_attempt_time = now() - interval '1 s'")
    assert run(conn, 100)["repaired"] == 1
    assert conn.execute("SELECT state FROM dlq_circuit_breaker_state").fetchone() == ("closed",)
    assert run(conn, 100)["repaired"] == 3


def test_callable_from_psql(conn: psycopg.Connection, db_url: str) -> None:
    insert(conn, VALID)
    out = subprocess.run(
        [str(_bin("psql")), db_url, "-At", "-c", "SELECT repaired FROM process_dlq_events_enhanced(10)"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "1"
