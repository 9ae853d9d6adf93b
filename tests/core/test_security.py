"""The security model, role by role, on a real server: each role is taken with SET ROLE on a superuser connection.

dlq_processor_role works dead letters but never sees, writes or reclassifies malicious ones; dlq_reader reads
and writes nothing; security_admin sees everything and changes classification only. SECURITY DEFINER code
resolves names only in schemas nobody else can create in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.errors import InsufficientPrivilege
from psycopg.types.json import Jsonb

from dlq_assets.core import jsonutil

PROCESSOR, READER, ADMIN = "dlq_processor_role", "dlq_reader", "security_admin"
ROLES = (PROCESSOR, READER, ADMIN)
CLASSES = (None, "suspicious", "malicious")
EVENT_TABLES = ("dead_letter_events", "dlq_poison_events")
Seed = dict[str, dict[str | None, int]]


@contextmanager
def as_role(conn: psycopg.Connection, role: str) -> Iterator[None]:
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    try:
        yield
    finally:
        conn.execute("RESET ROLE")


def ids_of(conn: psycopg.Connection, statement: str, params: Any = None) -> set[int]:
    return {row[0] for row in conn.execute(statement, params).fetchall()}


@pytest.fixture
def seeded(conn: psycopg.Connection) -> Seed:
    """As superuser: one unclassified, one suspicious and one malicious row in each event table, plus one row
    in each bookkeeping table. Returns the ids by table and classification."""
    seed: Seed = {table: {} for table in EVENT_TABLES}
    for classification in CLASSES:
        payload = {"classification": classification}
        (seed["dead_letter_events"][classification],) = conn.execute(
            "INSERT INTO dead_letter_events (reason, payload, classification) VALUES ('json_parse_error', %s, %s) "
            "RETURNING id",
            (Jsonb(payload), classification),
        ).fetchone()
        (seed["dlq_poison_events"][classification],) = conn.execute(
            "INSERT INTO dlq_poison_events (reason, payload, payload_checksum, idempotency_key, classification, "
            "poison_reason) VALUES ('json_parse_error', %s, %s, %s, %s, 'max_attempts') RETURNING id",
            (Jsonb(payload), jsonutil.payload_checksum(payload), f"poison:{classification}", classification),
        ).fetchone()
    conn.execute(
        "INSERT INTO raw_events (source, source_inode, source_offset, eventid, payload) "
        "VALUES ('/var/log/cowrie.json', '1', 0, 'cowrie.session.connect', '{}')"
    )
    conn.execute(
        "INSERT INTO dlq_processing_metrics (processing_session_id, processing_method, batch_size, processed_count, "
        "repaired_count, failed_count, skipped_count, processing_duration_ms, started_at, completed_at) "
        "VALUES ('s1', 'batch', 1, 1, 1, 0, 0, 5, now(), now())"
    )
    conn.execute("INSERT INTO dlq_circuit_breaker_state (breaker_name) VALUES ('repair')")
    return seed


# --- visibility ---------------------------------------------------------------------------------------------

VISIBLE = {PROCESSOR: (None, "suspicious"), READER: (None, "suspicious"), ADMIN: CLASSES}


@pytest.mark.parametrize("table", EVENT_TABLES)
@pytest.mark.parametrize("role", ROLES)
def test_each_role_sees_exactly_its_rows(conn: psycopg.Connection, seeded: Seed, table: str, role: str) -> None:
    ids = seeded[table]
    with as_role(conn, role):
        rows = dict(conn.execute(f"SELECT id, classification FROM {table}").fetchall())
        (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        by_id = conn.execute(f"SELECT id FROM {table} WHERE id = %s", (ids["malicious"],)).fetchone()
        unclassified = conn.execute(f"SELECT id FROM {table} WHERE classification IS NULL").fetchall()
    assert rows == {ids[c]: c for c in VISIBLE[role]}
    assert count == len(VISIBLE[role])
    assert (by_id is not None) == (role == ADMIN)
    # The design's policy `classification != 'malicious'` is NULL for these rows and would hide them.
    assert unclassified == [(ids[None],)]


def test_the_design_policy_would_have_hidden_unclassified_rows(conn: psycopg.Connection, seeded: Seed) -> None:
    ids = seeded["dead_letter_events"]
    design = ids_of(conn, "SELECT id FROM dead_letter_events WHERE classification != 'malicious'")
    with as_role(conn, PROCESSOR):
        visible = ids_of(conn, "SELECT id FROM dead_letter_events")
    assert design == {ids["suspicious"]}
    assert visible == design | {ids[None]}


@pytest.mark.parametrize("role", (PROCESSOR, READER))
def test_column_statistics_do_not_leak_hidden_values(conn: psycopg.Connection, seeded: Seed, role: str) -> None:
    conn.execute("ANALYZE dead_letter_events, dlq_poison_events")
    stats = (
        "SELECT count(*) FROM pg_stats WHERE tablename LIKE 'dead_letter_events%' OR tablename = 'dlq_poison_events'"
    )
    (owner_sees,) = conn.execute(stats).fetchone()
    with as_role(conn, role):
        (role_sees,) = conn.execute(stats).fetchone()
    assert owner_sees > 0 and role_sees == 0  # most-common values would show malicious payloads


# --- what each role may not do ------------------------------------------------------------------------------

POISON_INSERT = (
    "INSERT INTO dlq_poison_events (reason, payload, payload_checksum, idempotency_key, poison_reason, "
    "classification) VALUES ('probe', '{}', repeat('0', 64), 'probe', 'max_attempts', '{}')"
)
# No role owns anything: schema changes, policy bypasses, TRUNCATE and the idempotency ledger are out of reach.
EVERY_ROLE_DENIED = [
    "ALTER TABLE dead_letter_events DISABLE ROW LEVEL SECURITY",
    "ALTER TABLE dlq_poison_events DISABLE ROW LEVEL SECURITY",
    "ALTER TABLE dead_letter_events ADD COLUMN intruder integer",
    "CREATE POLICY intruder ON dead_letter_events USING (true)",
    "DROP POLICY dlq_hide_malicious ON dead_letter_events",
    "CREATE TRIGGER intruder BEFORE INSERT ON dead_letter_events FOR EACH ROW EXECUTE FUNCTION "
    "dlq_events_before_update()",
    "ALTER FUNCTION dlq_claim_events(integer, integer, integer, text, text) SECURITY DEFINER",
    "DROP TABLE dead_letter_events",
    "DROP TABLE dlq_poison_events",
    "DROP VIEW dlq_health",
    "CREATE TABLE public.intruder (id integer)",
    "CREATE FUNCTION public.intruder() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
    "CREATE SCHEMA intruder",
    "TRUNCATE dead_letter_events",
    "TRUNCATE dlq_poison_events",
    "TRUNCATE raw_events",
    "SELECT * FROM dlq_idempotency_keys",
    "INSERT INTO dlq_idempotency_keys (idempotency_key, event_id, event_created_at) VALUES ('k', 1, now())",
    "UPDATE dlq_idempotency_keys SET event_id = 0",
    "DELETE FROM dlq_idempotency_keys",
    "SELECT dlq_ensure_partitions()",
]
PROCESSOR_DENIED = [
    "UPDATE dead_letter_events SET classification = 'benign'",
    "UPDATE dlq_poison_events SET classification = 'benign'",
    "UPDATE dead_letter_events SET payload = '{}'",
    "UPDATE dead_letter_events SET source = 'elsewhere'",
    "UPDATE dlq_poison_events SET payload = '{}'",
    # outcomes only through the SECURITY DEFINER state machine: no forged history, no lifted quarantine
    "UPDATE dead_letter_events SET retry_count = 0",
    "UPDATE dead_letter_events SET error_history = '[]'",
    "UPDATE dead_letter_events SET resolved = true, resolved_at = now()",
    "UPDATE dead_letter_events SET quarantined_at = NULL",
    "UPDATE dead_letter_events SET next_attempt_at = now()",
    "DELETE FROM dead_letter_events",
    "DELETE FROM dlq_poison_events",
    "UPDATE dlq_poison_events SET redrive_count = 0",
    POISON_INSERT.replace("'{}')", "NULL)"),
    "INSERT INTO dead_letter_events (reason, payload, classification) VALUES ('probe', '{}', 'malicious')",
    "INSERT INTO dead_letter_events (reason, payload, classification) VALUES ('probe', '{}', 'benign')",
    POISON_INSERT.replace("'{}')", "'malicious')"),  # column allowed, row refused by the policy's WITH CHECK
    "UPDATE raw_events SET payload = '{}'",
    "DELETE FROM raw_events",
    "UPDATE dlq_processing_metrics SET failed_count = 0",
    "DELETE FROM dlq_processing_metrics",
    "DELETE FROM dlq_circuit_breaker_state",
]
READER_DENIED = [
    "INSERT INTO dead_letter_events (reason, payload) VALUES ('probe', '{}')",
    "UPDATE dead_letter_events SET retry_count = retry_count + 1",
    "DELETE FROM dead_letter_events",
    POISON_INSERT.replace("'{}')", "NULL)"),
    "UPDATE dlq_poison_events SET redrive_count = redrive_count + 1",
    "DELETE FROM dlq_poison_events",
    "INSERT INTO raw_events (source, source_inode, source_offset, eventid, payload) "
    "VALUES ('probe', '2', 1, 'probe', '{}')",
    "UPDATE raw_events SET repair_strategy = 'probe'",
    "DELETE FROM raw_events",
    "INSERT INTO dlq_processing_metrics (processing_session_id, processing_method, batch_size, processed_count, "
    "repaired_count, failed_count, skipped_count, processing_duration_ms, started_at, completed_at) "
    "VALUES ('probe', 'batch', 0, 0, 0, 0, 0, 0, now(), now())",
    "UPDATE dlq_processing_metrics SET failed_count = 0",
    "DELETE FROM dlq_processing_metrics",
    "INSERT INTO dlq_circuit_breaker_state (breaker_name) VALUES ('probe')",
    "UPDATE dlq_circuit_breaker_state SET state = 'open'",
    "DELETE FROM dlq_circuit_breaker_state",
    "SELECT * FROM dlq_claim_events(10)",
]
ADMIN_DENIED = [
    "UPDATE dead_letter_events SET payload = '{}'",
    "UPDATE dead_letter_events SET resolved = true",
    "UPDATE dead_letter_events SET classification = 'benign', retry_count = 0",
    "UPDATE dlq_poison_events SET redrive_count = 0",
    "DELETE FROM dead_letter_events",
    "DELETE FROM dlq_poison_events",
    "INSERT INTO dead_letter_events (reason, payload, classification) VALUES ('probe', '{}', 'benign')",
    "SELECT * FROM dlq_claim_events(10)",
]
DENIED = [
    *[(role, s) for role in ROLES for s in EVERY_ROLE_DENIED],
    *[(PROCESSOR, s) for s in PROCESSOR_DENIED],
    *[(READER, s) for s in READER_DENIED],
    *[(ADMIN, s) for s in ADMIN_DENIED],
]


@pytest.mark.parametrize(("role", "statement"), DENIED)
def test_statement_is_denied(conn: psycopg.Connection, seeded: Seed, role: str, statement: str) -> None:
    with as_role(conn, role), pytest.raises(InsufficientPrivilege):
        conn.execute(statement)


@pytest.mark.parametrize("role", ROLES)
def test_partitions_cannot_be_used_to_bypass_row_security(conn: psycopg.Connection, seeded: Seed, role: str) -> None:
    conn.execute("SELECT dlq_ensure_partitions('2031-01-01', 0)")  # one made after the migrations, too
    partitions = [row[0] for row in conn.execute("SELECT partition_name FROM dlq_partitions").fetchall()]
    assert {"dead_letter_events_default", "dead_letter_events_p203101"} <= set(partitions)
    for name in partitions:
        for statement in (f"SELECT * FROM {name}", f"UPDATE {name} SET retry_count = 0", f"DELETE FROM {name}"):
            with as_role(conn, role), pytest.raises(InsufficientPrivilege):
                conn.execute(statement)


# --- dlq_processor_role -------------------------------------------------------------------------------------


def test_processor_cannot_touch_malicious_rows(conn: psycopg.Connection, seeded: Seed) -> None:
    malicious = seeded["dead_letter_events"]["malicious"]
    with as_role(conn, PROCESSOR):
        updated = conn.execute(
            "UPDATE dead_letter_events SET last_processed_at = now() WHERE id = %s", (malicious,)
        ).rowcount
        everything = conn.execute("UPDATE dead_letter_events SET last_processed_at = now()").rowcount
    assert (updated, everything) == (0, 2)
    assert conn.execute("SELECT last_processed_at FROM dead_letter_events WHERE id = %s", (malicious,)).fetchone() == (
        None,
    )


def test_processor_writes_only_the_lease_columns_directly(conn: psycopg.Connection, seeded: Seed) -> None:
    visible = [seeded["dead_letter_events"][None], seeded["dead_letter_events"]["suspicious"]]
    with as_role(conn, PROCESSOR):
        updated = conn.execute(
            """
            UPDATE dead_letter_events
               SET processing_attempts = processing_attempts || '[{"attempt": 1}]', processing_lock = gen_random_uuid(),
                   lock_expires_at = now() + interval '1 minute', last_processed_at = now()
             WHERE id = ANY (%s)
            """,
            (visible,),
        ).rowcount
    assert updated == 2


def test_processor_inserts_a_dead_letter_and_the_definer_trigger_records_its_key(conn: psycopg.Connection) -> None:
    payload = {"eventid": "cowrie.login.failed", "n": 7}
    insert = (
        "INSERT INTO dead_letter_events (reason, payload, source, source_inode, source_offset) "
        "VALUES ('json_parse_error', %s, '/var/log/cowrie.json', '7', 100) "
        "RETURNING id, payload_checksum, idempotency_key"
    )
    with as_role(conn, PROCESSOR):
        event_id, checksum, key = conn.execute(insert, (Jsonb(payload),)).fetchone()
        duplicate = conn.execute(insert, (Jsonb(payload),)).fetchone()
    assert checksum == jsonutil.payload_checksum(payload)
    assert duplicate is None  # the trigger found the key it wrote, on a table the processor cannot read
    assert conn.execute("SELECT event_id FROM dlq_idempotency_keys WHERE idempotency_key = %s", (key,)).fetchone() == (
        event_id,
    )


def test_processor_poisons_through_the_state_machine_only_what_its_lease_holds(
    conn: psycopg.Connection, seeded: Seed
) -> None:
    ids = seeded["dead_letter_events"]
    with as_role(conn, PROCESSOR):
        claimed = conn.execute("SELECT id, processing_lock FROM dlq_claim_events(10, 60)").fetchall()
        lease = claimed[0][1]
        states = dict(
            conn.execute(
                "SELECT * FROM dlq_complete_batch(%s, %s, %s, NULL, %s)",
                (lease, [ids["suspicious"], ids["malicious"]], ["failed", "failed"], ["handler_missing"] * 2),
            ).fetchall()
        )
    assert states == {ids["suspicious"]: "poisoned", ids["malicious"]: "not_owned"}
    assert ids_of(conn, "SELECT id FROM dead_letter_events") == {ids[None], ids["malicious"]}
    assert conn.execute(
        "SELECT classification, poison_reason FROM dlq_poison_events WHERE id = %s", (ids["suspicious"],)
    ).fetchone() == ("suspicious", "non_retryable:handler_missing")


def test_processor_claims_only_non_malicious_rows(conn: psycopg.Connection, seeded: Seed) -> None:
    ids = seeded["dead_letter_events"]
    with as_role(conn, PROCESSOR):
        claimed = ids_of(conn, "SELECT id FROM dlq_claim_events(10, 60)")
    assert claimed == {ids[None], ids["suspicious"]}
    # Not only hidden: the owner, whom row security does not bind, claims no malicious row either.
    assert ids_of(conn, "SELECT id FROM dlq_claim_events(10, 60)") == set()


# --- dlq_reader ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("dead_letter_events", 2),
        ("dlq_poison_events", 2),
        ("raw_events", 1),
        ("dlq_processing_metrics", 1),
        ("dlq_circuit_breaker_state", 1),
    ],
)
def test_reader_reads_the_reporting_tables(conn: psycopg.Connection, seeded: Seed, table: str, expected: int) -> None:
    with as_role(conn, READER):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (expected,)


def test_reader_health_counts_malicious_rows_it_cannot_see(conn: psycopg.Connection, seeded: Seed) -> None:
    with as_role(conn, READER):
        health = conn.execute("SELECT malicious_events, total_events, poisoned_events FROM dlq_health").fetchone()
        rows = conn.execute("SELECT count(*) FROM dead_letter_events WHERE classification = 'malicious'").fetchone()
    assert health == (1, 3, 3)
    assert rows == (0,)


# --- security_admin -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("table", EVENT_TABLES)
def test_security_admin_reclassifies_and_visibility_follows(conn: psycopg.Connection, seeded: Seed, table: str) -> None:
    malicious = seeded[table]["malicious"]
    reclassify = f"UPDATE {table} SET classification = %s WHERE id = %s"
    lookup = f"SELECT classification FROM {table} WHERE id = %s"
    with as_role(conn, ADMIN):
        assert conn.execute(reclassify, ("benign", malicious)).rowcount == 1
    with as_role(conn, PROCESSOR):
        assert conn.execute(lookup, (malicious,)).fetchone() == ("benign",)
    with as_role(conn, ADMIN):
        assert conn.execute(reclassify, ("malicious", malicious)).rowcount == 1
        assert conn.execute(lookup, (malicious,)).fetchone() == ("malicious",)
    with as_role(conn, PROCESSOR):
        assert conn.execute(lookup, (malicious,)).fetchone() is None


# --- SECURITY DEFINER code ----------------------------------------------------------------------------------


def test_security_definer_functions_pin_a_search_path_nobody_else_can_write(conn: psycopg.Connection) -> None:
    functions = conn.execute(
        """
        SELECT p.oid::regprocedure::text, p.proconfig, p.prorettype = 'trigger'::regtype,
               EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                        WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
          FROM pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef
        """
    ).fetchall()
    names = {name for name, *_ in functions}
    assert {"dlq_events_before_insert()", "dlq_ensure_partitions(timestamp with time zone,integer)"} <= names
    for name, config, is_trigger, public_execute in functions:
        paths = [s.removeprefix("search_path=") for s in config or [] if s.startswith("search_path=")]
        assert len(paths) == 1, f"{name} does not pin search_path"
        schemas = [s.strip().strip('"') for s in paths[0].split(",")]
        assert "$user" not in schemas, name
        assert schemas[-1] == "pg_temp", f"{name}: pg_temp must be listed last, else it is searched first"
        for schema in schemas[:-1]:
            writers = conn.execute(
                """
                SELECT EXISTS (SELECT 1 FROM aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
                                WHERE a.grantee = 0 AND a.privilege_type = 'CREATE'),
                       array(SELECT r FROM unnest(%s::text[]) r WHERE has_schema_privilege(r, n.oid, 'CREATE'))
                  FROM pg_namespace n WHERE n.nspname = %s
                """,
                (list(ROLES), schema),
            ).fetchone()
            assert writers == (False, []), f"{name}: schema {schema} is missing or writable by others: {writers}"
        assert is_trigger or not public_execute, f"{name} is privileged and executable by PUBLIC"
    assert conn.execute("SELECT has_schema_privilege('dlq_reader', 'public', 'CREATE')").fetchone() == (False,)


def test_shadow_objects_do_not_reach_the_definer_insert_trigger(conn: psycopg.Connection) -> None:
    conn.execute("CREATE SCHEMA attacker")
    conn.execute("GRANT USAGE, CREATE ON SCHEMA attacker TO dlq_processor_role")
    payload = {"probe": "shadow", "n": 1}
    with as_role(conn, PROCESSOR):
        conn.execute(
            "CREATE FUNCTION attacker.dlq_payload_checksum(jsonb) RETURNS text LANGUAGE sql "
            "AS $$ SELECT repeat('0', 64) $$"
        )
        conn.execute(
            "CREATE FUNCTION attacker.sha256(bytea) RETURNS bytea LANGUAGE sql "
            "AS $$ SELECT decode(repeat('00', 32), 'hex') $$"
        )
        conn.execute(
            "CREATE TEMP TABLE dlq_idempotency_keys (idempotency_key varchar(128) PRIMARY KEY, event_id bigint, "
            "event_created_at timestamptz, first_seen_at timestamptz DEFAULT now())"
        )
        conn.execute("SET search_path = attacker, public")
        try:
            # The shadow is live for unqualified calls under this search_path...
            assert conn.execute("SELECT dlq_payload_checksum(%s)", (Jsonb(payload),)).fetchone() == ("0" * 64,)
            event_id, checksum = conn.execute(
                "INSERT INTO dead_letter_events (reason, payload) VALUES ('probe', %s) RETURNING id, payload_checksum",
                (Jsonb(payload),),
            ).fetchone()
            shadow_keys = conn.execute("SELECT count(*) FROM pg_temp.dlq_idempotency_keys").fetchone()
        finally:
            conn.execute("RESET search_path")
    # ...but the trigger, running as the owner, used none of it.
    assert checksum == jsonutil.payload_checksum(payload)
    assert shadow_keys == (0,)
    assert conn.execute(
        "SELECT count(*) FROM public.dlq_idempotency_keys WHERE event_id = %s", (event_id,)
    ).fetchone() == (1,)
