"""Security probes beyond tests/test_security.py: every function each role may call, checked for leaks and
writes; races around classification and quarantine; tampering across a processed backlog; shadowing through
the state machine."""

from __future__ import annotations

import json
import random
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.types.json import Jsonb

from dlq_assets.cli import main
from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.handlers import HandlerRegistry
from dlq_assets.core.processing.pool import process
from dlq_assets.core.processing.worker import Worker
from dlq_assets.devtools.generator import write_corrupted_log
from tests.core.test_security import ADMIN, PROCESSOR, READER, as_role
from tests.reliability.conftest import VALID, assert_ledger_holds, insert_dead_letter, take_ledger

pytestmark = pytest.mark.reliability

MARK = "MALICIOUS-PAYLOAD-7f3a"
SMALL = WorkerConfig(batch_size=50, min_batch_size=10, max_batch_size=200)
MALICIOUS_LEASE = uuid.UUID("00000000-0000-4000-8000-00000000beef")
CLAIM_ONE = "SELECT processing_lock FROM dlq_claim_events(1, 60, NULL, %s)"
Ids = dict[str, int]


@pytest.fixture
def rows(conn: psycopg.Connection) -> Ids:
    """As superuser, in one source: malicious dead letters (a replayable event, one held by a live lease, a
    fragment) the processor must never see or touch, and ordinary ones beside them."""
    fragment = {"raw_text": '{"eventid": "cowrie.session.connect", "note": "' + MARK}
    form = {"payload_form": "raw_text", "record_bytes": 60}
    at = {"source": "/m.json", "source_inode": "1"}
    ids = {
        "free": insert_dead_letter(conn, {**VALID, "note": MARK}, classification="malicious", source_offset=100, **at),
        "leased": insert_dead_letter(conn, {**VALID, "note": MARK + "!"}, classification="malicious",
                                     source_offset=150, **at),
        "fragment": insert_dead_letter(conn, fragment, reason="truncated", classification="malicious",
                                       metadata_json=Jsonb(form), source_offset=200, **at),
        "ordinary_fragment": insert_dead_letter(conn, {"raw_text": '"}'}, reason="json_parse_error",
                                                metadata_json=Jsonb(form), source_offset=261, **at),
        "ordinary": insert_dead_letter(conn, VALID, source_offset=300, **at),
    }  # fmt: skip
    conn.execute(
        "UPDATE dead_letter_events SET processing_lock = %s, lock_expires_at = now() + interval '10 minutes' "
        "WHERE id = %s",
        (MALICIOUS_LEASE, ids["leased"]),
    )
    return ids


def malicious_rows(conn: psycopg.Connection) -> Any:
    """Every malicious row as it is now, in either table (as superuser)."""
    return conn.execute(
        "SELECT jsonb_agg(to_jsonb(e) ORDER BY e.id) FROM (SELECT * FROM dead_letter_events "
        "WHERE classification = 'malicious' UNION ALL SELECT id, ingest_id, source, source_offset, source_inode, "
        "reason, payload, metadata_json, payload_checksum, retry_count, error_history, processing_attempts, "
        "resolved, resolved_at, resolution_method, idempotency_key, processing_lock, lock_expires_at, priority, "
        "classification, quarantined_at, next_attempt_at, created_at, updated_at, last_processed_at "
        "FROM dlq_poison_events WHERE classification = 'malicious') e"
    ).fetchone()[0]


def database_state(conn: psycopg.Connection) -> dict[str, str]:
    """A digest of every table and sequence in the schema (as superuser)."""
    relations = conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace "
        "AND c.relkind IN ('r', 'S') ORDER BY 1"
    ).fetchall()
    return {
        name: conn.execute(
            f"SELECT md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM (SELECT * FROM {name}) x"
        ).fetchone()[0]
        for (name,) in relations
    }


def executable(conn: psycopg.Connection, role: str) -> set[str]:
    rows = conn.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f' "
        "AND p.prorettype <> 'trigger'::regtype AND has_function_privilege(%s, p.oid, 'EXECUTE')",
        (role,),
    )
    return {name for (name,) in rows}


# --- dlq_processor_role: every function it may call, against malicious rows ------------------------------------

BREAKER_CALLS = {
    "check_circuit_breaker": ["SELECT check_circuit_breaker('probe')"],
    "dlq_breaker_acquire": ["SELECT * FROM dlq_breaker_acquire('probe')"],
    "dlq_breaker_ensure": ["SELECT * FROM dlq_breaker_ensure('probe')"],
    "dlq_breaker_record": ["SELECT * FROM dlq_breaker_record('probe', 0, 1)"],
    "record_circuit_breaker_failure": ["SELECT record_circuit_breaker_failure('probe')"],
    "dlq_breaker_trip": ["SELECT * FROM dlq_breaker_trip('probe')"],
}
PURE_CALLS = {
    "dlq_backoff_seconds": ["SELECT dlq_backoff_seconds(3, 30, 3600, 0.2)"],
    "dlq_cowrie_validation_errors": ["SELECT id, dlq_cowrie_validation_errors(payload) FROM dead_letter_events"],
    "dlq_is_cowrie_timestamp": ["SELECT dlq_is_cowrie_timestamp(payload -> 'timestamp') FROM dead_letter_events"],
    "dlq_is_ip": ["SELECT dlq_is_ip(payload -> 'src_ip') FROM dead_letter_events"],
    "dlq_is_port": ["SELECT dlq_is_port('22'::jsonb)"],
    "dlq_lease_key": ["SELECT dlq_lease_key('00000000-0000-4000-8000-00000000beef')"],
    "dlq_lease_holder": ["SELECT dlq_lease_holder('00000000-0000-4000-8000-00000000beef')"],
    "dlq_lease_mine": ["SELECT dlq_lease_mine('00000000-0000-4000-8000-00000000beef')"],
    "dlq_lease_take": ["SELECT dlq_lease_take(gen_random_uuid())"],
    "dlq_lease_any_mine": ["SELECT dlq_lease_any_mine()"],
    "dlq_partition_name": ["SELECT dlq_partition_name(now())"],
    "dlq_payload_checksum": ["SELECT id, dlq_payload_checksum(payload) FROM dead_letter_events"],
    "dlq_record_bytes": ["SELECT id, dlq_record_bytes(metadata_json) FROM dead_letter_events"],
    "dlq_retry_policy": ["SELECT * FROM dlq_retry_policy('truncated', 'unrepairable')"],
}
OUTCOMES = ("resolved", "failed", "quarantined", "released")
PROCESSOR_CALLS = {
    **BREAKER_CALLS,
    **PURE_CALLS,
    "dlq_claim_events": ["SELECT * FROM dlq_claim_events(100, 60)",
                         "SELECT * FROM dlq_claim_events(100, 60, NULL, 'truncated')"],
    "dlq_claim_batch": ["SELECT * FROM dlq_claim_batch(gen_random_uuid(), 100)",
                        "SELECT * FROM dlq_claim_batch(gen_random_uuid(), 100, NULL, 'truncated')"],
    # a forged journal: holding the lease's advisory lock, journal the malicious ids, then complete them (a lease
    # record set in the session counts for no transaction but the one named in it)
    "dlq_journal_batch": ["SELECT pg_advisory_lock(dlq_lease_key(%(lease)s))",
                          "SELECT set_config('dlq.leases', ' ' || pg_current_xact_id() || ':' || %(lease)s, false)",
                          "SELECT dlq_journal_batch(%(lease)s, %(ids)s)",
                          "INSERT INTO dlq_batch_leases (lease, event_ids) VALUES (%(lease)s, %(ids)s)",
                          "SELECT * FROM dlq_complete_batch(%(lease)s, %(ids)s, "
                          "array_fill('resolved'::text, ARRAY[cardinality(%(ids)s)]))",
                          "SELECT pg_advisory_unlock_all()", "RESET dlq.leases"],
    "dlq_check_lease_seconds": ["SELECT dlq_check_lease_seconds(60)"],  # a claim's argument checks
    "dlq_check_priority_max": ["SELECT dlq_check_priority_max(3)"],
    "dlq_due_events_sql": ["SELECT dlq_due_events_sql('c.id', 'true')"],  # the text of a claim's query, run by nothing
    "dlq_release_dead_batches": ["SELECT dlq_release_dead_batches()"],
    "dlq_forget_batch": ["SELECT dlq_forget_batch(%(malicious_lease)s)"],
    "dlq_claim_fragment_chains": ["SELECT * FROM dlq_claim_fragment_chains(%(lease)s, %(ids)s, 100000, 60)"],
    "dlq_complete_batch": [f"SELECT * FROM dlq_complete_batch(%(lease)s, %(ids)s, array_fill('{o}'::text, "
                           "ARRAY[cardinality(%(ids)s)]), NULL, array_fill('handler_missing'::text, "
                           "ARRAY[cardinality(%(ids)s)]))" for o in OUTCOMES],
    "dlq_heartbeat": ["SELECT dlq_heartbeat(%(malicious_lease)s, 3600)"],  # even with a malicious row's lease
    "dlq_release_stale_leases": ["SELECT dlq_release_stale_leases()"],
    "process_dlq_events_enhanced": ["SELECT * FROM process_dlq_events_enhanced(100)"],
}  # fmt: skip
PROCESSOR_HOLES: dict[str, str] = {}  # none left: record_dlq_processing_failure is owner-only now, and
# process_dlq_events_enhanced never claims malicious rows


def test_every_function_the_processor_may_call_is_probed(conn: psycopg.Connection) -> None:
    assert executable(conn, PROCESSOR) == PROCESSOR_CALLS.keys()


@pytest.mark.parametrize(
    "function",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=PROCESSOR_HOLES[name]))
        if name in PROCESSOR_HOLES
        else name
        for name in PROCESSOR_CALLS
    ],
)
def test_the_processor_cannot_reach_malicious_rows_through(conn: psycopg.Connection, rows: Ids, function: str) -> None:
    before = malicious_rows(conn)
    malicious = [rows["free"], rows["leased"], rows["fragment"]]
    outputs = []
    with as_role(conn, PROCESSOR):
        (lease,) = conn.execute(CLAIM_ONE, ("json_parse_error",)).fetchone()
        params = {"lease": lease, "ids": [*malicious, rows["ordinary"]], "malicious_lease": MALICIOUS_LEASE, **rows}
        for statement in PROCESSOR_CALLS[function]:
            try:
                outputs += conn.execute(statement, params).fetchall()
            except psycopg.Error as exc:  # refusing is fine; so is an answer that shows and changes nothing
                outputs.append(str(exc))
        visible = conn.execute("SELECT id FROM dead_letter_events UNION SELECT id FROM dlq_poison_events").fetchall()
    assert MARK not in repr(outputs)
    assert conn.execute("SELECT count(*) FROM raw_events WHERE strpos(payload::text, %s) > 0", (MARK,)).fetchone() == (
        0,
    )
    assert {i for (i,) in visible}.isdisjoint(malicious)
    assert malicious_rows(conn) == before  # not leased, extended, counted, moved, resolved or reclassified


@pytest.mark.parametrize("view", ["dlq_health", "dlq_partitions", "dlq_retry_policies", "dlq_cowrie_event_ids"])
def test_views_show_the_processor_counts_never_rows(conn: psycopg.Connection, rows: Ids, view: str) -> None:
    with as_role(conn, PROCESSOR):
        shown = conn.execute(f"SELECT * FROM {view}").fetchall()
    assert MARK not in repr(shown)


def test_an_event_classified_malicious_mid_lease_is_out_of_the_processors_reach(
    conn: psycopg.Connection, rows: Ids
) -> None:
    with as_role(conn, PROCESSOR):
        (lease,) = conn.execute(CLAIM_ONE, ("target_unavailable",)).fetchone()
    with as_role(conn, ADMIN):
        conn.execute("UPDATE dead_letter_events SET classification = 'malicious' WHERE id = %s", (rows["ordinary"],))
    with as_role(conn, PROCESSOR):
        states = conn.execute("SELECT * FROM dlq_complete_batch(%s, %s, '{quarantined}')", (lease, [rows["ordinary"]]))
        assert states.fetchall() == [(rows["ordinary"], "not_owned")]
        assert conn.execute("SELECT id FROM dead_letter_events WHERE id = %s", (rows["ordinary"],)).fetchone() is None
    assert conn.execute(
        "SELECT classification FROM dead_letter_events WHERE id = %s", (rows["ordinary"],)
    ).fetchone() == ("malicious",)


@pytest.mark.parametrize("outcome", ["resolved", "failed"])
def test_the_processor_cannot_lift_a_quarantine(db_url: str, conn: psycopg.Connection, outcome: str) -> None:
    event_id = insert_dead_letter(conn, VALID)
    conn.execute("UPDATE dead_letter_events SET payload = payload || '{\"n\": 1}' WHERE id = %s", (event_id,))
    process(db_url, SMALL)
    quarantined = conn.execute("SELECT to_jsonb(e) FROM dead_letter_events e WHERE id = %s", (event_id,)).fetchone()
    assert quarantined[0]["quarantined_at"] is not None
    lease = uuid.uuid4()
    with as_role(conn, PROCESSOR):
        conn.execute(
            "UPDATE dead_letter_events SET processing_lock = %s, lock_expires_at = now() + interval '1 minute' "
            "WHERE id = %s",
            (lease, event_id),
        )
        states = conn.execute(
            "SELECT final_state FROM dlq_complete_batch(%s, %s, %s, %s, %s)",
            (lease, [event_id], [outcome], ["forged"], ["handler_missing"]),
        ).fetchall()
    assert states == [("not_owned",)]
    row = conn.execute(
        "SELECT resolved, quarantined_at IS NOT NULL FROM dead_letter_events WHERE id = %s", (event_id,)
    ).fetchone()
    assert row == (False, True)


# --- dlq_reader and classification --------------------------------------------------------------------------

READER_CALLS = {
    **{name: PURE_CALLS[name] for name in PURE_CALLS},
    **{name: BREAKER_CALLS[name] for name in ("check_circuit_breaker", "record_circuit_breaker_failure")},
    "dlq_retention_preview": ["SELECT * FROM dlq_retention_preview(0)"],  # would drop last month: must not
}


def test_every_function_the_reader_may_call_is_probed(conn: psycopg.Connection) -> None:
    assert executable(conn, READER) == READER_CALLS.keys()


@pytest.mark.parametrize("function", READER_CALLS)
def test_the_reader_writes_nothing_through(conn: psycopg.Connection, rows: Ids, function: str) -> None:
    conn.execute("UPDATE dead_letter_events SET resolved = true, resolved_at = now() - interval '1 day', "
                 "processing_lock = NULL, lock_expires_at = NULL WHERE id = %s", (rows["ordinary"],))  # fmt: skip
    before = database_state(conn)
    with as_role(conn, READER):
        for statement in READER_CALLS[function]:
            with suppress(psycopg.errors.InsufficientPrivilege):  # the breaker functions would write: refused
                conn.execute(statement).fetchall()
    assert database_state(conn) == before


@pytest.mark.parametrize("table", ["dead_letter_events", "dlq_poison_events"])
@pytest.mark.parametrize("role", [READER, PROCESSOR])
def test_only_security_admin_changes_classification(conn: psycopg.Connection, table: str, role: str) -> None:
    with as_role(conn, role), pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(f"UPDATE {table} SET classification = NULL WHERE classification = 'malicious'")


# --- tampering ----------------------------------------------------------------------------------------------

TAMPERS = [  # each changes payload::text, so the stored checksum no longer matches
    "UPDATE dead_letter_events SET payload = jsonb_build_object('tampered', payload) WHERE id = %s",
    "UPDATE dead_letter_events SET payload = CASE WHEN payload ? 'raw_text' "
    "THEN jsonb_set(payload, '{raw_text}', to_jsonb((payload ->> 'raw_text') || ' ')) "
    "ELSE jsonb_build_array(payload) END WHERE id = %s",
    "UPDATE dead_letter_events SET payload = CASE WHEN jsonb_typeof(payload) = 'object' AND payload <> '{}' "
    "THEN payload - (SELECT min(k) FROM jsonb_object_keys(payload) k) ELSE '[]' END WHERE id = %s",
    "UPDATE dead_letter_events SET payload = CASE WHEN payload::text ~ ': [0-9]+[,}]' "  # 7 -> 7.0: same value
    "THEN regexp_replace(payload::text, ': ([0-9]+)([,}])', ': \\1.0\\2')::jsonb "
    "ELSE payload || '{\"x\": 1.0}' END WHERE id = %s",
    "UPDATE dead_letter_events SET payload = CASE WHEN payload::text LIKE '%%o%%' "  # a Cyrillic homoglyph
    "THEN replace(payload::text, 'o', 'о')::jsonb ELSE jsonb_build_object('tampered', payload) END WHERE id = %s",
]


def quarantined(conn: psycopg.Connection) -> dict[int, tuple[Any, ...]]:
    rows = conn.execute(
        "SELECT id, classification, reason, metadata_json ? 'original_reason', processing_attempts "
        "FROM dead_letter_events WHERE quarantined_at IS NOT NULL"
    )
    return {r[0]: r[1:] for r in rows}


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_every_tampered_event_is_quarantined_every_time(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, seed: int
) -> None:
    log = tmp_path / "cowrie.json"
    write_corrupted_log(log, n_events=300, seed=seed, corruption_rate=0.6)
    ingest_paths([log], url=db_url)
    process(db_url, SMALL)  # a processed backlog: some resolved, the rest waiting
    rng = random.Random(seed)
    waiting = [i for (i,) in conn.execute("SELECT id FROM dead_letter_events WHERE NOT resolved ORDER BY id")]
    done = [i for (i,) in conn.execute("SELECT id FROM dead_letter_events WHERE resolved ORDER BY id")]
    victims = rng.sample(waiting, min(12, len(waiting) // 2))
    for event_id in victims:
        conn.execute(rng.choice(TAMPERS), (event_id,))
    conn.execute("UPDATE dead_letter_events SET next_attempt_at = now() WHERE NOT resolved")  # all due again
    mismatched = "SELECT id FROM dead_letter_events WHERE dlq_payload_checksum(payload) <> payload_checksum"
    assert {i for (i,) in conn.execute(mismatched)} == set(victims)
    before = take_ledger(db_url)
    tampered = frozenset(k for k, e in before.events.items() if e.event_id in victims)

    process(db_url, SMALL)
    assert_ledger_holds(before, take_ledger(db_url), tampered=tampered)
    first = quarantined(conn)
    assert first.keys() == set(victims)
    assert all(row[:3] == ("tampered", "checksum_mismatch", True) for row in first.values())
    assert conn.execute("SELECT count(*) FROM raw_events WHERE dlq_event_id = ANY (%s)", (victims,)).fetchone() == (0,)
    conn.execute("UPDATE dead_letter_events SET next_attempt_at = now() WHERE NOT resolved")
    process(db_url, SMALL)  # and again: quarantined events are never claimed again
    assert quarantined(conn) == first
    assert_ledger_holds(before, take_ledger(db_url), tampered=tampered)
    health = json.loads(CliRunner().invoke(main, ["--database-url", db_url, "health", "--json"]).output)
    assert health["tampered_events"] == len(victims) and "tampered_events" in health["breaches"]
    # A resolved event is never processed again, but tampering with it still shows.
    for event_id in rng.sample(done, min(2, len(done))):
        conn.execute(rng.choice(TAMPERS), (event_id,))
        out = CliRunner().invoke(main, ["--database-url", db_url, "inspect", str(event_id), "--json"]).output
        assert json.loads(out)["checksum_ok"] is False


SPLIT = {**VALID, "eventid": "cowrie.command.input", "input": "echo '{passwd}'"}


@pytest.mark.parametrize(
    "tamper",
    [
        "jsonb_set(payload, '{raw_text}', to_jsonb(replace(payload ->> 'raw_text', 'passwd', 'shadow')))",
        "'{\"raw_text\": 1}'",  # no longer the shape its payload_form says
    ],
    ids=["edited", "reshaped"],
)
def test_a_tampered_fragment_is_quarantined_never_stitched(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, tamper: str
) -> None:
    text = json.dumps(SPLIT)
    at = text.index("{passwd")
    log = tmp_path / "split.json"
    log.write_text(text[:at] + "\n" + text[at:] + "\n")  # a raw newline where the next line reads as a new record
    ingest_paths([log], url=db_url)
    (head, tail) = [i for (i,) in conn.execute("SELECT id FROM dead_letter_events ORDER BY source_offset")]
    conn.execute(f"UPDATE dead_letter_events SET payload = {tamper} WHERE id = %s", (tail,))
    before = take_ledger(db_url)
    tampered = frozenset(k for k, e in before.events.items() if e.event_id == tail)
    process(db_url, WorkerConfig(batch_size=1, min_batch_size=1, max_batch_size=1))  # the tail is a neighbour
    assert_ledger_holds(before, take_ledger(db_url), tampered=tampered)
    assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == (0,)
    assert conn.execute(
        "SELECT error_history -> -1 ->> 'error_class' FROM dead_letter_events WHERE id = %s", (head,)
    ).fetchone() == ("unrepairable",)  # the head alone cannot be repaired: no crash, no breaker failure


def test_a_tampered_poisoned_event_blocks_no_redrive(db_url: str, conn: psycopg.Connection) -> None:
    ids = [insert_dead_letter(conn, {**VALID, "n": i}, reason="other_pipeline") for i in range(3)]
    Worker(db_url, SMALL, HandlerRegistry(default=None)).run()  # no handler: poisoned at once
    conn.execute("UPDATE dlq_poison_events SET payload = payload || '{\"n\": 99}' WHERE id = %s", (ids[0],))
    result = CliRunner().invoke(main, ["--database-url", db_url, "redrive", "--reason", "other_pipeline", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.output)["redriven"]) == ids[1:]
    claimable = "SELECT count(*) FROM dead_letter_events WHERE id = %s AND quarantined_at IS NULL"
    assert conn.execute(claimable, (ids[0],)).fetchone() == (0,)  # the tampered one never goes back to work


# --- SECURITY DEFINER code with a hostile search_path -----------------------------------------------------------

SHADOWS = [
    "CREATE TABLE attacker.calls (fn text)",
    "CREATE FUNCTION attacker.now() RETURNS timestamptz LANGUAGE plpgsql "
    "AS $$ BEGIN INSERT INTO attacker.calls VALUES ('now'); RETURN '1999-01-01'; END $$",
    "CREATE FUNCTION attacker.left(text, integer) RETURNS text LANGUAGE plpgsql "
    "AS $$ BEGIN INSERT INTO attacker.calls VALUES ('left'); RETURN 'SHADOWED'; END $$",
    "CREATE FUNCTION attacker.dlq_retry_policy(text, text) RETURNS public.dlq_retry_policies LANGUAGE plpgsql "
    "AS $$ DECLARE p public.dlq_retry_policies; BEGIN INSERT INTO attacker.calls VALUES ('dlq_retry_policy'); "
    "p.max_attempts := 1; p.retryable := false; RETURN p; END $$",
    "CREATE FUNCTION attacker.dlq_backoff_seconds(integer, numeric, numeric, numeric) RETURNS numeric "
    "LANGUAGE plpgsql AS $$ BEGIN INSERT INTO attacker.calls VALUES ('dlq_backoff_seconds'); RETURN -86400; END $$",
]


def test_a_shadowing_schema_on_the_callers_path_does_not_reach_the_state_machine(conn: psycopg.Connection) -> None:
    event_id = insert_dead_letter(conn, {"n": 1}, reason="json_parse_error")
    conn.execute("CREATE SCHEMA attacker")
    conn.execute("GRANT USAGE, CREATE ON SCHEMA attacker TO dlq_processor_role")
    with as_role(conn, PROCESSOR):
        for statement in SHADOWS:
            conn.execute(statement)
        conn.execute("SET search_path = attacker, pg_catalog, public")
        try:
            assert conn.execute("SELECT now(), left('abc', 1)").fetchone() == (
                conn.execute("SELECT '1999-01-01'::timestamptz").fetchone()[0], "SHADOWED",
            )  # fmt: skip  # live for the caller's own statements
            conn.execute("TRUNCATE attacker.calls")
            (lease,) = conn.execute("SELECT processing_lock FROM public.dlq_claim_events(10, 60)").fetchone()
            states = conn.execute(
                "SELECT * FROM public.dlq_complete_batch(%s, %s, %s, NULL, %s, %s)",
                (lease, [event_id], ["failed"], ["error"], ["boom"]),
            ).fetchall()
            calls = conn.execute("SELECT fn FROM attacker.calls").fetchall()
        finally:
            conn.execute("RESET search_path")
    assert calls == []  # nothing of the caller's schema ran inside the state machine
    assert states == [(event_id, "retry_scheduled")]  # the real policy: 10 attempts, not the shadow's 1
    history, attempts, later = conn.execute(
        "SELECT error_history -> -1, processing_attempts -> -1, next_attempt_at > now() FROM dead_letter_events "
        "WHERE id = %s",
        (event_id,),
    ).fetchone()
    assert history["message"] == "boom" and not history["at"].startswith("1999")
    assert not attempts["claimed_at"].startswith("1999") and later
