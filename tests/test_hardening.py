"""What a hostile audit tried, on a real server: infrastructure failures and the breaker, malicious rows and the
table owner's worker, the processor role and the breaker's configuration."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.errors import InsufficientPrivilege, InvalidParameterValue

from dlq_assets.cli import main
from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.core.operations.health import Thresholds, breaches, snapshot
from dlq_assets.core.processing.config import LEASE_MODES, WorkerConfig
from dlq_assets.core.processing.handlers import ClaimedEvent, Claimer, HandlerRegistry, Outcome
from dlq_assets.core.processing.worker import Worker
from tests.core.operations.test_legacy import make_legacy, query, upgrade_committed
from tests.core.processing.test_worker import SMALL, VALID, insert_dead_letter
from tests.core.test_security import ADMIN, PROCESSOR, as_role


@pytest.fixture
def processor_url(db_url: str) -> Iterator[str]:
    """The test database as a login member of dlq_processor_role (roles are cluster-wide: dropped after)."""
    role = f"dlq_test_processor_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE dlq_processor_role").format(sql.Identifier(role)))
    parts = urlsplit(db_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    try:
        yield urlunsplit(parts._replace(netloc=f"{role}@{host}"))
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def let_the_probe_through(conn: psycopg.Connection) -> None:
    conn.execute(
        "UPDATE dlq_circuit_breaker_state SET next_attempt_time = now() - interval '1 s' WHERE state <> 'closed'"
    )


def untouched(conn: psycopg.Connection) -> tuple[int, ...]:
    """Events charged an attempt, poisoned, resolved, still leased or journalled, errors recorded: all 0 when the
    failures were the infrastructure's."""
    return conn.execute(
        """
        SELECT count(*) FILTER (WHERE retry_count > 0), (SELECT count(*) FROM dlq_poison_events),
               count(*) FILTER (WHERE resolved), count(*) FILTER (WHERE processing_lock IS NOT NULL),
               (SELECT count(*) FROM dlq_batch_leases), count(*) FILTER (WHERE error_history <> '[]')
          FROM dead_letter_events
        """
    ).fetchone()


# --- an infrastructure failure opens the breaker and costs no event an attempt ---------------------------------


@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_a_target_that_refuses_writes_opens_the_breaker_and_charges_nothing(
    db_url: str, conn: psycopg.Connection, processor_url: str, lease_mode: str
) -> None:
    for i in range(20):
        insert_dead_letter(conn, {**VALID, "n": i})
    conn.execute("REVOKE INSERT ON raw_events FROM dlq_processor_role")
    config = WorkerConfig(**SMALL, lease_mode=lease_mode)
    for run in range(10):  # every run meets the refusal: the first with a batch, the rest as the half-open probe
        let_the_probe_through(conn)
        report = Worker(processor_url, config).run()
        assert report.infrastructure_error and "InsufficientPrivilege" in report.infrastructure_error, run
        assert conn.execute("SELECT state FROM dlq_circuit_breaker_state").fetchone() == ("open",)
    assert untouched(conn) == (0, 0, 0, 0, 0, 0)
    assert Worker(processor_url, config).run().breaker_denied  # open: the next run waits
    conn.execute("GRANT INSERT ON raw_events TO dlq_processor_role")
    let_the_probe_through(conn)
    report = Worker(processor_url, config).run()
    assert report.resolved == 20 and report.infrastructure_error is None
    assert conn.execute("SELECT state FROM dlq_circuit_breaker_state").fetchone() == ("closed",)


@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_a_target_refusing_every_write_for_want_of_a_right_charges_nothing(
    db_url: str, conn: psycopg.Connection, processor_url: str, lease_mode: str
) -> None:
    """Not the table's privilege but one its writes need (raw_events' checksum calls sha256): every write is
    refused with a privilege error, which is the system's, not 300 events' failures."""
    for i in range(30):
        insert_dead_letter(conn, {**VALID, "n": i})
    conn.execute("REVOKE EXECUTE ON FUNCTION sha256(bytea) FROM PUBLIC")
    try:
        report = Worker(processor_url, WorkerConfig(**SMALL, lease_mode=lease_mode)).run()
        assert report.infrastructure_error and "InsufficientPrivilege" in report.infrastructure_error
        assert untouched(conn) == (0, 0, 0, 0, 0, 0)
    finally:
        conn.execute("GRANT EXECUTE ON FUNCTION sha256(bytea) TO PUBLIC")
    assert Worker(db_url, WorkerConfig(**SMALL, lease_mode=lease_mode)).run().breaker_denied  # open meanwhile


def test_the_cli_says_an_infrastructure_failure_and_exits_5(
    db_url: str, conn: psycopg.Connection, processor_url: str
) -> None:
    insert_dead_letter(conn, VALID)
    conn.execute("REVOKE INSERT ON raw_events FROM dlq_processor_role")
    result = CliRunner().invoke(main, ["--database-url", processor_url, "process"])
    assert result.exit_code == 5, result.output
    assert "infrastructure failure" in result.stderr and "no event was charged" in result.stderr
    assert untouched(conn) == (0, 0, 0, 0, 0, 0)


class CutsItsOwnConnection:
    """A handler whose database connection is killed under it: the server going away mid-batch."""

    name = "cuts_connection"

    def handle(self, events: Sequence[ClaimedEvent], claimer: Claimer) -> list[Outcome]:
        claimer.conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")  # type: ignore[attr-defined]
        return []


@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_a_lost_connection_opens_the_breaker_and_gives_the_batch_back_uncharged(
    db_url: str, conn: psycopg.Connection, lease_mode: str
) -> None:
    for i in range(5):
        insert_dead_letter(conn, {**VALID, "n": i})
    registry = HandlerRegistry(default=CutsItsOwnConnection())
    report = Worker(db_url, WorkerConfig(**SMALL, lease_mode=lease_mode), registry).run()
    assert report.infrastructure_error and "AdminShutdown" in report.infrastructure_error
    assert "and then" not in report.infrastructure_error  # the batch was given back through a fresh connection
    assert conn.execute("SELECT state FROM dlq_circuit_breaker_state").fetchone() == ("open",)
    assert untouched(conn) == (0, 0, 0, 0, 0, 0)


# --- malicious rows are never claimed, whoever runs the worker --------------------------------------------------


@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_the_owners_worker_never_claims_a_malicious_row(db_url: str, conn: psycopg.Connection, lease_mode: str) -> None:
    bad = insert_dead_letter(conn, {**VALID, "note": "evil"}, classification="malicious")
    good = insert_dead_letter(conn, VALID)
    fragment = {"raw_text": '{"eventid": "cowrie.session.connect", "note": "'}
    at = {"source": "/m.json", "source_inode": "1", "metadata_json": '{"payload_form": "raw_text", "record_bytes": 48}'}
    insert_dead_letter(conn, fragment, reason="truncated", classification="malicious", source_offset=0, **at)
    insert_dead_letter(conn, {"raw_text": '"}'}, reason="json_parse_error", source_offset=49, **at)
    report = Worker(db_url, WorkerConfig(**SMALL, lease_mode=lease_mode)).run()  # db_url: the table owner
    assert report.claimed == 2
    rows = conn.execute(
        "SELECT resolved, processing_attempts FROM dead_letter_events WHERE classification = 'malicious'"
    ).fetchall()
    assert rows == [(False, []), (False, [])]
    assert conn.execute("SELECT count(*) FROM raw_events WHERE payload ? 'note'").fetchone() == (0,)
    assert conn.execute("SELECT resolved FROM dead_letter_events WHERE id = %s", (good,)).fetchone() == (True,)
    assert conn.execute("SELECT resolved FROM dead_letter_events WHERE id = %s", (bad,)).fetchone() == (False,)


def test_security_admin_releases_a_reviewed_row_and_only_then_it_is_processed(
    db_url: str, conn: psycopg.Connection
) -> None:
    bad = insert_dead_letter(conn, {**VALID, "note": "false alarm"}, classification="malicious")
    with as_role(conn, PROCESSOR), pytest.raises(InsufficientPrivilege):
        conn.execute("SELECT dlq_release_reviewed(%s, 'mine now')", (bad,))
    with as_role(conn, ADMIN):
        with pytest.raises(InvalidParameterValue):
            conn.execute("SELECT dlq_release_reviewed(%s, '  ')", (bad,))
        conn.execute("SELECT dlq_release_reviewed(%s, 'ticket 42: a scanner of ours')", (bad,))
        with pytest.raises(psycopg.errors.NoDataFound):  # released once; not malicious any more
            conn.execute("SELECT dlq_release_reviewed(%s, 'again')", (bad,))
    classification, entry = conn.execute(
        "SELECT classification, error_history -> -1 FROM dead_letter_events WHERE id = %s", (bad,)
    ).fetchone()
    assert classification == "reviewed"
    assert entry["note"] == "ticket 42: a scanner of ours" and entry["as"] == ADMIN and entry["was"] == "malicious"
    assert Worker(db_url, WorkerConfig(**SMALL)).run().resolved == 1
    assert conn.execute("SELECT count(*) FROM raw_events WHERE payload ->> 'note' = 'false alarm'").fetchone() == (1,)


# --- the processor records outcomes; it neither writes nor configures the breaker --------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE dlq_circuit_breaker_state SET state = 'closed', failure_threshold = 1000000",
        "INSERT INTO dlq_circuit_breaker_state (breaker_name, failure_threshold) VALUES ('mine', 1000000)",
        "DELETE FROM dlq_circuit_breaker_state",
        "SELECT dlq_breaker_configure('dlq_processing', 1000000, 2000000)",
        "SELECT dlq_breaker_set('dlq_processing', 'reset')",
    ],
)
def test_the_processor_cannot_steer_the_breaker(conn: psycopg.Connection, statement: str) -> None:
    conn.execute("SELECT dlq_breaker_ensure('dlq_processing')")
    with as_role(conn, PROCESSOR), pytest.raises(InsufficientPrivilege):
        conn.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT dlq_breaker_ensure('dlq_processing', 1000000000, 2000000000)",
        "SELECT dlq_breaker_record('dlq_processing', 0, 2147483647)",
        "SELECT dlq_breaker_record('dlq_processing', 2147483647, 0)",
        "SELECT dlq_breaker_record('dlq_processing', -1, 0)",
        "SELECT dlq_breaker_ensure(E'esc\\x1b[31m')",
        "SELECT dlq_breaker_ensure('')",
        f"SELECT dlq_breaker_ensure('{'x' * 65}')",
    ],
)
def test_breaker_arguments_are_bounded(conn: psycopg.Connection, statement: str) -> None:
    with as_role(conn, PROCESSOR), pytest.raises(InvalidParameterValue):
        conn.execute(statement)


def test_the_longest_a_breaker_can_be_held_open_is_its_bounded_timeout(conn: psycopg.Connection) -> None:
    with as_role(conn, ADMIN):
        for threshold, timeout in ((0, 60), (10001, 60), (5, 0), (5, 3601)):
            with pytest.raises(InvalidParameterValue):
                conn.execute("SELECT dlq_breaker_configure('dlq_processing', %s, %s)", (threshold, timeout))
        conn.execute("SELECT dlq_breaker_configure('dlq_processing', 10000, 3600)")
    with as_role(conn, PROCESSOR):
        for _ in range(3):
            conn.execute("SELECT dlq_breaker_record('dlq_processing', 0, 100000)")
        conn.execute("SELECT dlq_breaker_trip('dlq_processing')")
    state, count, wait = conn.execute(
        "SELECT state, failure_count, next_attempt_time - now() <= interval '3600 s' FROM dlq_circuit_breaker_state"
    ).fetchone()
    assert (state, wait) == ("open", True) and count <= 1_000_000


# --- duplicate keys: the record's text is kept whole and flagged, never one of its values dropped silently --------

VALID_CONNECT = {
    "eventid": "cowrie.session.connect", "src_ip": "1.2.3.4", "src_port": 4242, "dst_ip": "10.0.0.1",
    "dst_port": 22, "session": "3f2a9c0b1d4f", "protocol": "ssh", "message": "New connection", "sensor": "s1",
    "timestamp": "2024-01-15T10:30:01.123456Z",
}  # fmt: skip
DUPLICATE_IP = (
    '{"eventid": "cowrie.session.connect", "src_ip": "1.2.3.4", "src_port": 4242, "dst_ip": "10.0.0.1", '
    '"dst_port": 22, "session": "3f2a9c0b1d4e", "protocol": "ssh", "message": "New connection", '
    '"sensor": "s1", "timestamp": "2024-01-15T10:30:00.123456Z", "src_ip": "6.6.6.6"}'
)
DUPLICATE_USERNAME = (  # a login without its session: not valid, so a dead letter
    '{"eventid": "cowrie.login.failed", "username": "root", "password": "x", "username": "admin", '
    '"src_ip": "1.2.3.4", "timestamp": "2024-01-15T10:30:00.123456Z"}'
)
NESTED_DUPLICATE = DUPLICATE_IP.replace('"src_ip": "6.6.6.6"', '"src_ip": "1.2.3.4", "extra": {"k": 1, "k": 2}')


def test_ingest_keeps_a_record_with_duplicate_keys_whole_and_flags_it(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "cowrie.json"
    log.write_text("\n".join([DUPLICATE_IP, DUPLICATE_USERNAME, NESTED_DUPLICATE, json.dumps(VALID_CONNECT)]) + "\n")
    report = ingest_paths([log], url=db_url)
    assert report.duplicate_keys == 3 and report.raw_inserted == 3 and report.dlq_inserted == 1
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT payload ->> 'src_ip', original_text, duplicate_keys FROM raw_events ORDER BY source_offset"
        ).fetchall()
        letter = conn.execute("SELECT payload, metadata_json FROM dead_letter_events").fetchone()
    assert rows[0] == ("6.6.6.6", DUPLICATE_IP, True)  # jsonb's value, and the record as written beside it
    assert rows[1] == ("1.2.3.4", NESTED_DUPLICATE, True)
    assert rows[2][1:] == (None, False)
    payload, metadata = letter
    assert payload == {"raw_text": DUPLICATE_USERNAME}  # both usernames kept
    assert metadata["duplicate_keys"] is True and metadata["payload_form"] == "raw_text"


def test_a_damaged_record_with_duplicate_keys_is_not_repaired_into_one_of_its_values(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    log = tmp_path / "cowrie.json"
    log.write_text(DUPLICATE_IP[:-1] + ",}\n")  # a trailing comma: tokenizer_fix would repair it
    ingest_paths([log], url=db_url)
    Worker(db_url, WorkerConfig(**SMALL)).run()
    assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == (0,)
    last = conn.execute("SELECT error_history -> -1 ->> 'message' FROM dead_letter_events").fetchone()
    assert last == ("duplicate_keys",)


def test_the_legacy_upgrade_keeps_duplicate_keys_and_flags_them(empty_db_url: str) -> None:
    rows = [
        (None, "/l.json", 1, "json_parse_error", '{"a": 1, "a": 2}', None, False, None, datetime.now(UTC)),
        (None, "/l.json", 2, "json_parse_error", '{"x": [{"k": 1, "k": 1}]}', None, False, None, datetime.now(UTC)),
        (None, "/l.json", 3, "json_parse_error", '{"a": 1, "b": {"a": 2}}', None, False, None, datetime.now(UTC)),
    ]
    make_legacy(empty_db_url, rows)
    upgrade_committed(empty_db_url)
    got = query(empty_db_url, "SELECT payload, metadata_json FROM dead_letter_events ORDER BY source_offset")
    assert got[0] == ({"raw_text": '{"a": 1, "a": 2}'}, {"legacy_duplicate_keys": True})
    assert got[1] == ({"raw_text": '{"x": [{"k": 1, "k": 1}]}'}, {"legacy_duplicate_keys": True})
    assert got[2] == ({"a": 1, "b": {"a": 2}}, None)  # one key per object: nothing to flag


def test_the_legacy_upgrade_takes_deep_nesting_and_flags_duplicate_keys_in_metadata(empty_db_url: str) -> None:
    deep = "[" * 1000 + "]" * 1000
    rows = [
        (None, "/l.json", 1, "json_parse_error", deep, '{"k": 1, "k": 2}', False, None, datetime.now(UTC)),
    ]
    make_legacy(empty_db_url, rows)
    upgrade_committed(empty_db_url)
    ((kept_whole, metadata),) = query(
        empty_db_url, "SELECT length(payload::text) > 1000, metadata_json FROM dead_letter_events"
    )
    assert kept_whole
    assert metadata == {
        "legacy_metadata_duplicate_keys": True, "legacy_metadata_raw_text": '{"k": 1, "k": 2}',
    }  # fmt: skip


# --- an event's failure stays that event's -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        "ALTER TABLE raw_events ADD CONSTRAINT no_failed_logins CHECK (eventid <> 'cowrie.login.failed') NOT VALID",
        """CREATE FUNCTION refuse_failed_logins() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.eventid = 'cowrie.login.failed' THEN RAISE EXCEPTION 'policy'; END IF; RETURN NEW; END $$;
           CREATE TRIGGER refuse_failed_logins BEFORE INSERT ON raw_events
               FOR EACH ROW EXECUTE FUNCTION refuse_failed_logins()""",
        # a trigger that drops the row without an error: the event must not be resolved without its target row
        """CREATE FUNCTION drop_failed_logins() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.eventid = 'cowrie.login.failed' THEN RETURN NULL; END IF; RETURN NEW; END $$;
           CREATE TRIGGER drop_failed_logins BEFORE INSERT ON raw_events
               FOR EACH ROW EXECUTE FUNCTION drop_failed_logins()""",
        # a privilege error about the row, not the role (it holds the rights): the event's, not the system's
        """CREATE FUNCTION deny_failed_logins() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.eventid = 'cowrie.login.failed' THEN
               RAISE EXCEPTION 'not for you' USING ERRCODE = 'insufficient_privilege'; END IF; RETURN NEW; END $$;
           CREATE TRIGGER deny_failed_logins BEFORE INSERT ON raw_events
               FOR EACH ROW EXECUTE FUNCTION deny_failed_logins()""",
        # errors of the infrastructure's kinds, raised for one row: still that event's, since others are written
        """CREATE FUNCTION busy_failed_logins() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.eventid = 'cowrie.login.failed' THEN
               RAISE EXCEPTION 'busy' USING ERRCODE = 'lock_not_available'; END IF; RETURN NEW; END $$;
           CREATE TRIGGER busy_failed_logins BEFORE INSERT ON raw_events
               FOR EACH ROW EXECUTE FUNCTION busy_failed_logins()""",
        """CREATE FUNCTION enrich_failed_logins() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.eventid = 'cowrie.login.failed' THEN PERFORM enrichment_not_deployed(NEW.payload); END IF;
           RETURN NEW; END $$;
           CREATE TRIGGER enrich_failed_logins BEFORE INSERT ON raw_events
               FOR EACH ROW EXECUTE FUNCTION enrich_failed_logins()""",
        # a refusal at COMMIT would fail the whole batch: the worker checks constraints as each statement ends
        """CREATE FUNCTION late_refusal() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.eventid = 'cowrie.login.failed' THEN RAISE EXCEPTION 'at commit'; END IF; RETURN NULL; END $$;
           CREATE CONSTRAINT TRIGGER late_refusal AFTER INSERT ON raw_events DEFERRABLE INITIALLY DEFERRED
               FOR EACH ROW EXECUTE FUNCTION late_refusal()""",
    ],
    ids=[
        "constraint", "trigger", "silent_trigger", "privilege_trigger", "lock_trigger", "missing_function",
        "deferred_trigger",
    ],
)  # fmt: skip
@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_a_target_refusing_one_event_charges_that_event_only(
    db_url: str, conn: psycopg.Connection, refusal: str, lease_mode: str
) -> None:
    for i in range(10):
        insert_dead_letter(conn, {**VALID, "n": i})
    login = {**VALID, "eventid": "cowrie.login.failed", "username": "root", "password": "x"}
    refused = insert_dead_letter(conn, login)
    conn.execute(refusal)
    report = Worker(db_url, WorkerConfig(**SMALL, lease_mode=lease_mode)).run()
    assert report.infrastructure_error is None and report.resolved == 10 and report.retried == 1
    row = conn.execute(
        "SELECT retry_count, error_history -> -1 ->> 'error_class' FROM dead_letter_events WHERE id = %s", (refused,)
    ).fetchone()
    assert row == (1, "target_write_failed")
    assert conn.execute("SELECT state, failure_count FROM dlq_circuit_breaker_state").fetchone() == ("closed", 1)
    written = conn.execute("SELECT count(*), count(*) FILTER (WHERE dlq_event_id = %s) FROM raw_events", (refused,))
    assert written.fetchone() == (10, 0)


@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_another_events_row_at_the_position_is_not_this_events(
    db_url: str, conn: psycopg.Connection, lease_mode: str
) -> None:
    """Two dead letters claiming one position with different contents: the idempotent write finds a row there,
    but not this event's; resolving it would leave its data nowhere. The same event again is idempotent."""
    at = {"source": "/var/log/cowrie.json", "source_inode": "7", "source_offset": 1000}
    mine, same = {**VALID, "n": 1}, {**VALID, "n": 2}
    conn.execute(
        "INSERT INTO raw_events (source, source_inode, source_offset, eventid, payload) VALUES "
        "(%s, %s, %s, 'cowrie.login.failed', %s), (%s, %s, 1001, 'cowrie.login.failed', %s)",
        (at["source"], at["source_inode"], at["source_offset"], json.dumps({**VALID, "n": 0}),
         at["source"], at["source_inode"], json.dumps(same)),
    )  # fmt: skip
    other = insert_dead_letter(conn, mine, **at)
    again = insert_dead_letter(conn, same, **{**at, "source_offset": 1001})
    report = Worker(db_url, WorkerConfig(**SMALL, lease_mode=lease_mode)).run()
    assert (report.resolved, report.retried) == (1, 1)
    rows = conn.execute(
        "SELECT id, resolved, error_history -> -1 ->> 'error_class' FROM dead_letter_events ORDER BY id"
    ).fetchall()
    assert rows == [(other, False, "target_write_failed"), (again, True, None)]


@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_a_row_security_policy_refusing_one_event_charges_that_event_only(
    conn: psycopg.Connection, processor_url: str, lease_mode: str
) -> None:
    """A policy's WITH CHECK fails with a privilege error (42501) for the rows it refuses: those events fail, the
    rest are written, and nothing stalls (taken as a missing privilege, the event would head every batch)."""
    for i in range(10):
        insert_dead_letter(conn, {**VALID, "n": i})
    refused = insert_dead_letter(conn, {**VALID, "eventid": "cowrie.login.failed", "username": "root", "password": "x"})
    conn.execute("ALTER TABLE raw_events ENABLE ROW LEVEL SECURITY")
    conn.execute("CREATE POLICY everything_read ON raw_events FOR SELECT USING (true)")
    conn.execute(
        "CREATE POLICY no_failed_logins ON raw_events FOR INSERT WITH CHECK (eventid <> 'cowrie.login.failed')"
    )
    try:
        report = Worker(processor_url, WorkerConfig(**SMALL, lease_mode=lease_mode)).run()
        assert report.infrastructure_error is None and (report.resolved, report.retried) == (10, 1)
        row = conn.execute(
            "SELECT retry_count, error_history -> -1 ->> 'message' FROM dead_letter_events WHERE id = %s", (refused,)
        ).fetchone()
        assert row[0] == 1 and "row-level security" in row[1]
        assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == (10,)
    finally:
        conn.execute("DROP POLICY no_failed_logins ON raw_events; DROP POLICY everything_read ON raw_events")
        conn.execute("ALTER TABLE raw_events DISABLE ROW LEVEL SECURITY")


@pytest.mark.parametrize("record_bytes", ["1e30", "12.5", '"many"', "-3"])
@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_a_processors_forged_record_length_stalls_nothing(
    db_url: str, conn: psycopg.Connection, record_bytes: str, lease_mode: str
) -> None:
    at = {"source": "/f.json", "source_inode": "1"}
    forged = f'{{"payload_form": "raw_text", "record_bytes": {record_bytes}}}'
    with as_role(conn, PROCESSOR):
        insert_dead_letter(
            conn, {"raw_text": '{"eventid": "cowrie.session'}, "truncated", source_offset=0, metadata_json=forged, **at
        )
    for i in range(5):
        insert_dead_letter(conn, {**VALID, "n": i})
    report = Worker(db_url, WorkerConfig(**SMALL, lease_mode=lease_mode)).run()
    assert report.infrastructure_error is None and report.resolved == 5 and report.retried == 1
    assert conn.execute(
        "SELECT count(*) FROM dead_letter_events WHERE error_history::text LIKE '%handler_error%'"
    ).fetchone() == (0,)


def test_a_timestamp_postgresql_cannot_store_is_invalid_not_a_failed_batch(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    far = {**VALID_CONNECT, "timestamp": "2024-01-15T08:00:02.1+23:00"}
    log = tmp_path / "cowrie.json"
    log.write_text(json.dumps(far) + "\n" + json.dumps(VALID_CONNECT) + "\n")
    report = ingest_paths([log], url=db_url)  # the event after it is ingested too
    assert (report.raw_inserted, report.dlq_inserted, dict(report.dlq_reasons)) == (1, 1, {"validation_failed": 1})
    insert_dead_letter(conn, far)  # a transient failure of it: replayed, refused by validation, not by the target
    Worker(db_url, WorkerConfig(**SMALL)).run()
    assert conn.execute("SELECT count(*) FROM dlq_circuit_breaker_state WHERE failure_count > 0").fetchone() == (0,)


def test_a_processor_cannot_open_a_breaker_under_a_made_up_name(conn: psycopg.Connection) -> None:
    with as_role(conn, PROCESSOR):
        conn.execute("SELECT dlq_breaker_trip('nobody-probes-me')")
    assert conn.execute("SELECT count(*) FROM dlq_circuit_breaker_state").fetchone() == (0,)


def test_health_counts_a_breaker_open_only_while_it_denies(conn: psycopg.Connection) -> None:
    conn.execute("SELECT dlq_breaker_configure('b', 1, 1)")
    conn.execute("SELECT dlq_breaker_trip('b')")
    assert "breaker_open" in breaches(snapshot(conn), Thresholds())
    conn.execute("UPDATE dlq_circuit_breaker_state SET next_attempt_time = now() - interval '1 s'")
    assert "breaker_open" not in breaches(snapshot(conn), Thresholds())  # the next worker's probe decides


def test_a_nul_escape_beside_a_duplicate_key_is_flagged_too(db_url: str, tmp_path: Path) -> None:
    record = DUPLICATE_IP.replace('"New connection"', '"New\\u0000connection"')
    log = tmp_path / "cowrie.json"
    log.write_text(record + "\n")
    assert ingest_paths([log], url=db_url).duplicate_keys == 1
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT payload ->> 'message', original_text, duplicate_keys FROM raw_events").fetchone()
    assert row == ("Newconnection", record, True)


def test_the_chart_draws_reasons_that_look_like_mathtext_as_text(conn: psycopg.Connection) -> None:
    from dlq_assets.core.operations.analysis import analyze, chart_png

    for i, reason in enumerate(("$x^$", "r$\\frac{$", "a $\\undefinedcmd$ b", "$\\alpha$")):
        insert_dead_letter(conn, {**VALID, "n": i}, reason=reason)
    assert chart_png(analyze(conn)).startswith(b"\x89PNG")


def test_inspect_shows_payload_numbers_exactly_and_says_where_it_cuts(db_url: str, conn: psycopg.Connection) -> None:
    exact = {"big": Decimal("100000000000000000000000.5"), "small": Decimal("0.1000000000000000055511151231257827")}
    event_id = conn.execute(
        "INSERT INTO dead_letter_events (reason, payload) VALUES ('json_parse_error', %s::jsonb) RETURNING id",
        (json.dumps({"big": "B", "small": "S", "padding": "x" * 3000}).replace('"B"', str(exact["big"]))
         .replace('"S"', str(exact["small"])),),
    ).fetchone()[0]  # fmt: skip
    result = CliRunner().invoke(main, ["--database-url", db_url, "inspect", str(event_id), "--json"])
    payload = json.loads(result.stdout, parse_float=Decimal)["payload"]
    assert (payload["big"], payload["small"]) == (exact["big"], exact["small"])
    result = CliRunner().invoke(main, ["--database-url", db_url, "inspect", str(event_id)])
    assert "100000000000000000000000.5" in result.stdout and "0.1000000000000000055511151231257827" in result.stdout
    assert "more characters: --json has them all" in result.stdout
