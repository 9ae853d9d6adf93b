"""Transaction leases (40_claims.sql): row locks as the lease, a journal for crash accounting, fencing by holder."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from dlq_assets.core.processing.breaker import is_infrastructure_failure
from dlq_assets.core.processing.claims import _Journal
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.pool import process
from dlq_assets.core.processing.worker import Worker
from tests.conftest import TESTS_DIR
from tests.core.processing.test_claim import BACKLOG, claimed_plans, fill_backlog
from tests.core.test_security import PROCESSOR, as_role
from tests.reliability.conftest import VALID, insert_dead_letter, wait_until

CLAIM = "SELECT id FROM dlq_claim_batch(%s, %s)"
JOURNAL = "SELECT dlq_journal_batch(%s, %s, 'test-worker')"


@pytest.fixture
def other(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A second session: the batch's journal connection, or another worker."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def batch(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """The batch session, its transaction opened by the test (which may terminate it: closed, not committed)."""
    connection = psycopg.connect(db_url)
    try:
        yield connection
    finally:
        connection.close()


def events(conn: psycopg.Connection[Any], n: int) -> list[int]:
    return [insert_dead_letter(conn, {**VALID, "n": i}) for i in range(n)]


def claim(batch: psycopg.Connection[Any], journal: psycopg.Connection[Any], n: int) -> tuple[uuid.UUID, list[int]]:
    """As the worker does: give back dead batches (in the journal's session), claim, journal."""
    journal.execute("SELECT dlq_release_dead_batches()")
    lease = uuid.uuid4()
    ids = [i for (i,) in batch.execute(CLAIM, (lease, n))]
    journal.execute(JOURNAL, (lease, ids))
    return lease, ids


def terminate(conn: psycopg.Connection[Any], session: psycopg.Connection[Any]) -> None:
    """End ``session``'s backend as a crash would, and wait until it is gone (its locks with it)."""
    pid = session.info.backend_pid
    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_until(lambda: not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone(), "exit")


def released_once_dead(conn: psycopg.Connection[Any]) -> int:
    """What dlq_release_dead_batches charges once a killed worker's backends are gone: a process that exits leaves
    its sessions (and the lease's lock) to the server, which ends them a moment later."""
    return wait_until(
        lambda: conn.execute("SELECT dlq_release_dead_batches()").fetchone()[0], "the dead worker's sessions to end"
    )


def health(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    return conn.execute("SELECT locked_events, stale_locks FROM dlq_health").fetchone()


def test_a_claim_writes_nothing_and_the_row_locks_keep_everyone_else_out(
    conn: psycopg.Connection, batch: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    ids = events(conn, 5)
    before = conn.execute("SELECT xmin::text FROM dead_letter_events ORDER BY id").fetchall()
    _, claimed = claim(batch, other, 3)
    assert claimed == ids[:3]
    assert conn.execute("SELECT xmin::text FROM dead_letter_events ORDER BY id").fetchall() == before  # no write
    assert health(conn) == (3, 0)
    assert [i for (i,) in other.execute("SELECT id FROM dlq_claim_events(10, 60)")] == ids[3:]  # SKIP LOCKED
    with other.transaction():  # a second transaction lease gets nothing the first holds
        assert other.execute(CLAIM, (uuid.uuid4(), 10)).fetchall() == []


def test_completion_resolves_records_the_claim_and_ends_the_journal_entry(
    conn: psycopg.Connection, batch: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    events(conn, 2)
    lease, ids = claim(batch, other, 2)
    states = batch.execute(
        "SELECT * FROM dlq_complete_batch(%s, %s, ARRAY['resolved', 'failed'], ARRAY['replay', NULL], "
        "ARRAY[NULL, 'invalid_event'])",
        (lease, ids),
    ).fetchall()
    batch.commit()
    assert sorted(states) == [(ids[0], "resolved"), (ids[1], "retry_scheduled")]
    rows = conn.execute("SELECT processing_attempts, processing_lock FROM dead_letter_events ORDER BY id").fetchall()
    for attempts, lock in rows:
        assert lock is None
        assert [(a["lease"], a["as"], a["worker"], a["attempt"]) for a in attempts] == [
            (str(lease), "transaction", "test-worker", 1)
        ]
    assert conn.execute("SELECT count(*) FROM dlq_batch_leases").fetchone() == (0,)
    assert health(conn) == (0, 0)


def test_only_the_session_holding_the_lease_completes_its_rows(
    conn: psycopg.Connection, batch: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    events(conn, 2)
    lease, ids = claim(batch, other, 2)
    forged = other.execute(
        "SELECT * FROM dlq_complete_batch(%s, %s, ARRAY['resolved', 'resolved'])", (lease, ids)
    ).fetchall()
    assert sorted(forged) == [(ids[0], "not_owned"), (ids[1], "not_owned")]  # same lease, not the holder
    batch.rollback()  # the batch gives up: nothing happened, and nothing is counted (no crash)
    assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE resolved").fetchone() == (0,)


def test_a_dead_batch_is_stale_and_the_next_claim_counts_its_attempt(
    db_url: str, conn: psycopg.Connection, batch: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    ids = events(conn, 3)
    lease, claimed = claim(batch, other, 2)
    terminate(conn, batch)  # the worker's connection dies
    assert health(conn) == (0, 2)  # the journal outlived its holder: stale
    with psycopg.connect(db_url) as batch_again:
        lease_again, again = claim(batch_again, other, 10)
        assert sorted(again) == ids  # given back at once, with the attempt counted
        batch_again.rollback()
    rows = conn.execute(
        "SELECT id, retry_count, error_history -> -1 ->> 'error_class', error_history -> -1 ->> 'lease' "
        "FROM dead_letter_events ORDER BY id"
    ).fetchall()
    assert rows == [(i, 1, "lease_expired", str(lease)) if i in claimed else (i, 0, None, None) for i in ids]
    assert conn.execute("SELECT array_agg(lease) FROM dlq_batch_leases").fetchone() == ([lease_again],)


def test_an_event_that_kills_every_worker_is_poisoned_not_looped(conn: psycopg.Connection, db_url: str) -> None:
    (event_id,) = events(conn, 1)
    (cap,) = conn.execute("SELECT max_attempts FROM dlq_retry_policy('target_unavailable', 'lease_expired')").fetchone()
    for _ in range(cap):
        with closing(psycopg.connect(db_url)) as batch, psycopg.connect(db_url, autocommit=True) as journal:
            conn.execute("UPDATE dead_letter_events SET next_attempt_at = now()")  # due again, backoff skipped
            claim(batch, journal, 1)
            terminate(conn, batch)  # the next claim gives it back first, counting the attempt, even though
            # the batch that claims it next dies too
    assert conn.execute("SELECT dlq_release_dead_batches()").fetchone() == (1,)  # the last crash
    poisoned = conn.execute(
        "SELECT poison_reason, retry_count, jsonb_array_length(processing_attempts) FROM dlq_poison_events "
        "WHERE id = %s",
        (event_id,),
    ).fetchone()
    assert poisoned == ("max_attempts", cap, cap)  # every crash on record, as a claim and as an attempt


def test_a_live_batch_is_never_swept(
    conn: psycopg.Connection, batch: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    events(conn, 2)
    claim(batch, other, 2)
    assert other.execute("SELECT dlq_release_dead_batches()").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM dlq_batch_leases").fetchone() == (1,)


def test_a_claim_outside_a_transaction_cannot_be_journalled(
    conn: psycopg.Connection, other: psycopg.Connection[Any]
) -> None:
    events(conn, 1)
    lease = uuid.uuid4()
    ids = [i for (i,) in conn.execute(CLAIM, (lease, 1))]  # autocommit: the locks ended with the statement
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="not held: claim with dlq_claim_batch inside"):
        other.execute(JOURNAL, (lease, ids))


def test_a_lease_cannot_be_claimed_twice(
    conn: psycopg.Connection, batch: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    events(conn, 2)
    lease, _ = claim(batch, other, 1)
    with other.transaction(), pytest.raises(psycopg.errors.LockNotAvailable, match="held by another session"):
        other.execute(CLAIM, (lease, 1))


def test_the_processor_cannot_journal_what_it_cannot_see(
    conn: psycopg.Connection, batch: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    (ordinary,) = events(conn, 1)
    hidden = insert_dead_letter(conn, VALID, classification="malicious", source_offset=9)
    lease, _ = claim(batch, other, 1)
    with as_role(conn, PROCESSOR), pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        conn.execute(JOURNAL, (lease, [ordinary, hidden]))
    assert conn.execute("SELECT count(*) FROM dlq_batch_leases WHERE %s = ANY (event_ids)", (hidden,)).fetchone() == (
        0,
    )


def test_the_worker_in_both_modes_ends_every_event_in_the_same_state(db_url: str, conn: psycopg.Connection) -> None:
    """Same backlog, same outcomes: the lease mode changes how a batch is held, not what happens to it."""
    results = {}
    for mode in ("committed", "transaction"):
        conn.execute("TRUNCATE dead_letter_events, dlq_idempotency_keys, raw_events, dlq_poison_events")
        for i in range(20):
            insert_dead_letter(conn, {**VALID, "n": i} if i % 4 else {**VALID, "timestamp": "never"}, source_offset=i)
        report = process(db_url, WorkerConfig(batch_size=8, min_batch_size=8, max_batch_size=8, lease_mode=mode))
        results[mode] = (
            report.resolved,
            report.retried,
            conn.execute(
                "SELECT array_agg(source_offset ORDER BY source_offset), "
                "count(*) FILTER (WHERE processing_lock IS NULL) FROM dead_letter_events WHERE resolved"
            ).fetchone(),
        )
    assert results["committed"] == results["transaction"] == (15, 5, ([i for i in range(20) if i % 4], 15))


@pytest.mark.slow
def test_claim_and_completion_plans_stay_on_indexes_on_a_large_backlog(
    conn: psycopg.Connection, other: psycopg.Connection[Any]
) -> None:
    """No per-batch cost that grows with the table: the claim merges index scans, the completion finds its
    rows by primary key (a join alone scanned every partition), the policy table is read once per statement."""
    fill_backlog(conn, BACKLOG)
    populated = {r[0] for r in conn.execute("SELECT DISTINCT tableoid::regclass::text FROM dead_letter_events")}
    assert len(populated) >= 3
    lease = uuid.uuid4()
    with conn.transaction():
        plans = claimed_plans(conn, "SELECT id FROM dlq_claim_batch(%s, 1000)", (lease,))
        claim = next(p for p in reversed(plans) if "FOR UPDATE SKIP LOCKED" in p)
        assert "Merge Append" in claim and "Sort  " not in claim and "Seq Scan" not in claim, claim
    lease = uuid.uuid4()
    with conn.transaction():
        ids = [i for (i,) in conn.execute(CLAIM, (lease, 1000))]
        other.execute(JOURNAL, (lease, ids))
        plans = claimed_plans(
            conn, "SELECT * FROM dlq_complete_batch(%s, %s, array_fill('failed'::text, ARRAY[1000]))", (lease, ids)
        )
        complete = next(p for p in plans if "WITH input" in p)
        for partition in populated:
            assert f"Seq Scan on {partition} " not in complete, complete
            # the UPDATE and the poisoning DELETE both by primary key: not a walk of a whole partial index
            assert complete.count(f"{partition}_pkey") == 2, complete
        # the poisoning DELETE probes each failed row by key: an id list in its index condition would be searched
        # again for every row it joins (quadratic when a whole batch fails)
        deletion = complete[complete.index("Delete on dead_letter_events") :]
        assert "Index Cond: (id = i_" in deletion and "= ANY (" not in deletion.split("CTE poisoned")[0], complete
        # failed rows' policies looked up by dlq_retry_policy, inlined: a scan of its small table, no call per row
        assert "Seq Scan on dlq_retry_policies" in complete and "Function Scan on dlq_retry_policy" not in complete, (
            complete
        )


def _create_0013_completion(conn: psycopg.Connection[Any]) -> None:
    """The pre-baseline chain's two-probe dlq_complete_batch (0013, in the fixture) as dlq_complete_batch_0013."""
    text = (TESTS_DIR / "fixtures" / "sql_chain" / "0013_cheaper_completion.sql").read_text(encoding="utf-8")
    body = text[text.index("CREATE OR REPLACE FUNCTION dlq_complete_batch(") :]
    conn.execute(body.replace("FUNCTION dlq_complete_batch(", "FUNCTION dlq_complete_batch_0013(", 1))


_TABLES = ("dead_letter_events", "dlq_poison_events", "dlq_batch_leases", "dlq_event_counts")
_STATE = """
SELECT (SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e.id), '[]') FROM dead_letter_events e),
       (SELECT coalesce(jsonb_agg(to_jsonb(p) ORDER BY p.id), '[]') FROM dlq_poison_events p),
       (SELECT coalesce(jsonb_agg(to_jsonb(b) ORDER BY b.lease), '[]') FROM dlq_batch_leases b),
       (SELECT jsonb_agg(c ORDER BY c.month) FROM (
            SELECT month, sum(total) AS total, sum(pending) AS pending, sum(processed) AS processed,
                   sum(resolution_seconds) AS resolution_seconds, sum(high_retry) AS high_retry,
                   sum(malicious) AS malicious, sum(high_priority) AS high_priority, sum(quarantined) AS quarantined
              FROM dlq_event_counts GROUP BY month) c)
"""


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_single_update_completion_leaves_what_0013s_left(
    db_url: str, conn: psycopg.Connection, other: psycopg.Connection[Any], seed: int
) -> None:
    """dlq_complete_batch finds each row once; the fixture's 0013 finds them twice, through a pipeline of CTEs. On
    the same batches (both
    kinds of lease, every outcome, rows owned and not, policies that retry, cap and refuse, events near their cap)
    both return the same states and leave every row of every table the same, to the microsecond: one transaction,
    so now() is the same, with jitter 0 so the backoff is too. A retry's next_attempt_at counts from the failure
    (clock_timestamp()) here and from the transaction's start in 0013: it may be later, by less than the test takes."""
    rng = random.Random(seed)
    _create_0013_completion(conn)
    conn.execute(
        "INSERT INTO dlq_retry_policies (reason, error_class, max_attempts, retryable) VALUES "
        "('truncated', NULL, 3, true), ('json_parse_error', 'unrepairable', 10, false), "
        "(NULL, 'target_unavailable', 4, true) ON CONFLICT DO NOTHING"
    )
    conn.execute("UPDATE dlq_retry_policies SET jitter = 0")
    reasons = ["truncated", "json_parse_error", "target_unavailable", "invalid_utf8"]
    for i in range(80):
        insert_dead_letter(
            conn, {**VALID, "n": i}, reason=rng.choice(reasons), retry_count=rng.choice([0, 0, 1, 2, 3, 8, 9]),
            classification=rng.choice([None, None, "malicious"]), priority=rng.randint(1, 10),
        )  # fmt: skip
    conn.execute("UPDATE dead_letter_events SET quarantined_at = now() WHERE id % 11 = 0")
    conn.execute("UPDATE dead_letter_events SET resolved = true, resolved_at = now() WHERE id % 13 = 0")
    committed = conn.execute("SELECT processing_lock FROM dlq_claim_events(20, 600)").fetchone()[0]
    all_ids = [i for (i,) in conn.execute("SELECT id FROM dead_letter_events ORDER BY id")]
    seen: set[str] = set()
    with psycopg.connect(db_url) as batch:  # a transaction lease, journalled from the other session
        lease, held = claim(batch, other, 25)
        held_by_committed = [
            i for (i,) in batch.execute("SELECT id FROM dead_letter_events WHERE processing_lock = %s", (committed,))
        ]
        for current, owned in ((lease, held), (committed, held_by_committed)):
            ids = owned + rng.sample(all_ids, 15) + [10**9]  # some not this lease's, one that does not exist
            rng.shuffle(ids)
            outcomes = [rng.choice(["resolved", "failed", "failed", "quarantined", "released"]) for _ in ids]
            classes = [rng.choice([None, "unrepairable", "target_unavailable", "lease_expired"]) for _ in ids]
            messages = [rng.choice([None, "why", "x" * 2100]) for _ in ids]
            methods = [rng.choice([None, "repair:tokenizer_fix", "m" * 80]) for _ in ids]
            args = (current, ids, outcomes, methods, classes, messages)
            batch.execute("SAVEPOINT before")
            results = {}
            for name in ("dlq_complete_batch_0013", "dlq_complete_batch"):
                states = batch.execute(f"SELECT * FROM {name}(%s, %s, %s, %s, %s, %s)", args).fetchall()
                results[name] = (sorted(states, key=str), batch.execute(_STATE).fetchone())
                batch.execute("ROLLBACK TO SAVEPOINT before")
            old, new = results["dlq_complete_batch_0013"], results["dlq_complete_batch"]
            seen.update(state for _, state in new[0])
            assert new[0] == old[0]
            for table, now_rows, then_rows in zip(_TABLES, new[1], old[1], strict=True):
                assert [d for d in _differences(now_rows, then_rows) if not _later_retry(d)] == [], table
        batch.rollback()
    assert seen == {"resolved", "retry_scheduled", "poisoned", "quarantined", "released", "not_owned"}


def _later_retry(difference: tuple[Any, ...]) -> bool:
    """A next_attempt_at set from the failure's time instead of the transaction's start: later, within a minute."""
    _, column, value, expected = difference
    if column != "next_attempt_at" or not isinstance(value, str) or not isinstance(expected, str):
        return False
    ahead = datetime.fromisoformat(value) - datetime.fromisoformat(expected)
    return timedelta(0) <= ahead < timedelta(minutes=1)


def _differences(rows: list[dict[str, Any]] | None, expected: list[dict[str, Any]] | None) -> list[Any]:
    """(row index, column, value, expected value) wherever two snapshots of a table differ."""
    if rows is None or expected is None or len(rows) != len(expected):
        return [] if rows == expected else [("rows", len(rows or []), len(expected or []))]
    return [(n, k, r.get(k), e.get(k)) for n, (r, e) in enumerate(zip(rows, expected, strict=True))
            for k in sorted(r.keys() | e.keys()) if r.get(k) != e.get(k)]  # fmt: skip


def test_journalled_ids_are_stored_uncompressed(conn: psycopg.Connection, other: psycopg.Connection[Any]) -> None:
    """A batch's ids live for a second: compressing them costs more than it saves (0021_baseline)."""
    ids = events(conn, 1000)
    with psycopg.connect(conn.info.dsn) as batch:
        lease, held = claim(batch, other, 1000)
        assert len(held) == 1000
        compression, size = conn.execute(
            "SELECT pg_column_compression(event_ids), pg_column_size(event_ids) FROM dlq_batch_leases WHERE lease = %s",
            (lease,),
        ).fetchone()
        assert compression is None and size >= 8 * len(ids)
        batch.rollback()


DIES_AT_ONCE = """
import os, sys
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.handlers import HandlerRegistry
from dlq_assets.core.processing.worker import Worker

class Dies:
    name = "dies"

    def handle(self, events, claimer):
        os._exit(3)  # no cleanup, no flush: the moment its events reach a handler

config = WorkerConfig(batch_size=5, min_batch_size=5, max_batch_size=5)
Worker(sys.argv[1], config, HandlerRegistry(default=Dies())).run()
"""


def test_a_worker_dying_as_its_handler_starts_has_its_batch_on_record(conn: psycopg.Connection, db_url: str) -> None:
    """The journal entry is sent before any handler runs and committed by the server whether or not the worker
    reads the answer: a worker its first event kills is charged for its batch like any other dead worker."""
    ids = events(conn, 5)
    died = subprocess.run([sys.executable, "-c", DIES_AT_ONCE, db_url], capture_output=True, text=True, timeout=60)
    assert died.returncode == 3, died.stderr
    journalled = wait_until(
        lambda: conn.execute("SELECT array_agg(i ORDER BY i) FROM dlq_batch_leases, unnest(event_ids) i").fetchone()[0],
        "the dead worker's journal entry",
        timeout=10,
    )
    assert journalled == sorted(ids)
    assert released_once_dead(conn) == 5
    charged = conn.execute(
        "SELECT count(*) FROM dead_letter_events WHERE retry_count = 1 AND error_history -> 0 ->> 'error_class' = "
        "'lease_expired'"
    ).fetchone()
    assert charged == (5,)


@pytest.mark.parametrize("record", ["valid", "fragment"])
def test_a_refused_journal_entry_stops_the_batch_and_charges_nothing(
    conn: psycopg.Connection, db_url: str, record: str
) -> None:
    """A journal entry the server refuses is the batch's failure wherever the worker collects it: before the
    completion (valid events) or inside the stitching handler, which claims neighbours only of journalled events
    (a fragment). Raised from the run, as it is, never taken for a handler's error."""
    if record == "valid":
        (event_id,) = events(conn, 1)
    else:
        cut = '{"eventid": "cowrie.session.connect", "src_ip": "203.0'
        metadata = Jsonb({"payload_form": "raw_text", "record_bytes": len(cut)})
        event_id = insert_dead_letter(
            conn, {"raw_text": cut}, reason="json_parse_error", source="/var/log/cowrie/cowrie.json",
            source_inode="7", source_offset=0, metadata_json=metadata,
        )  # fmt: skip
    conn.execute(
        """
        CREATE FUNCTION refuse_journal() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'journal refused' USING ERRCODE = 'check_violation'; END $$;
        CREATE TRIGGER refuse_journal BEFORE INSERT ON dlq_batch_leases
            FOR EACH ROW EXECUTE FUNCTION refuse_journal();
        """
    )
    with pytest.raises(psycopg.errors.CheckViolation, match="journal refused"):
        Worker(db_url, WorkerConfig(batch_size=10, min_batch_size=10, max_batch_size=10)).run()
    row = conn.execute(
        "SELECT resolved, retry_count, error_history, processing_lock FROM dead_letter_events WHERE id = %s",
        (event_id,),
    ).fetchone()
    assert row == (False, 0, [], None)
    assert conn.execute("SELECT count(*) FROM dlq_batch_leases").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == (0,)


def test_a_batch_stopped_by_its_journal_leaves_no_entry_to_charge(conn: psycopg.Connection, db_url: str) -> None:
    """The batch's own entry taken, its neighbours' refused: the worker stops, and the entry it left is forgotten,
    not charged at the next claim as a dead holder's (nobody died, no event is at fault)."""
    record = json.dumps({**VALID, "eventid": "cowrie.session.connect", "protocol": "ssh"})
    cut = record.index("203.0") + 3
    for offset, text in ((0, record[:cut]), (cut + 1, record[cut:])):  # a record split by a newline into two
        metadata = Jsonb({"payload_form": "raw_text", "record_bytes": len(text.encode())})
        insert_dead_letter(
            conn, {"raw_text": text}, reason="json_parse_error", source="/var/log/cowrie/cowrie.json",
            source_inode="7", source_offset=offset, metadata_json=metadata,
        )  # fmt: skip
    conn.execute(
        """
        CREATE FUNCTION refuse_second_entry() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT FROM dlq_batch_leases WHERE lease = NEW.lease) THEN
                RAISE EXCEPTION 'second entry refused' USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_second_entry BEFORE INSERT ON dlq_batch_leases
            FOR EACH ROW EXECUTE FUNCTION refuse_second_entry();
        """
    )
    with pytest.raises(psycopg.errors.CheckViolation, match="second entry refused"):
        Worker(db_url, WorkerConfig(batch_size=1, min_batch_size=1, max_batch_size=1)).run()
    assert conn.execute("SELECT count(*) FROM dlq_batch_leases").fetchone() == (0,)
    assert conn.execute("SELECT dlq_release_dead_batches()").fetchone() == (0,)
    assert conn.execute(
        "SELECT sum(retry_count), count(*) FILTER (WHERE resolved) FROM dead_letter_events"
    ).fetchone() == (
        0,
        0,
    )


def test_a_journal_whose_session_is_gone_says_so_as_an_infrastructure_failure(
    conn: psycopg.Connection, other: psycopg.Connection[Any]
) -> None:
    """The entry is sent without waiting; its session ended meanwhile, collecting it raises the connection's
    failure (an infrastructure failure: the breaker opens, no event is charged), kept as the journal's error."""
    journal = _Journal(other)
    terminate(conn, other)
    with pytest.raises(psycopg.OperationalError) as failed:
        journal.send(uuid.uuid4(), [1, 2], "test-worker")
        journal.settle()
    assert is_infrastructure_failure(failed.value)
    assert journal.error is failed.value


@pytest.mark.parametrize("window", [-1, 1073741825, None])
def test_a_stitching_window_out_of_range_is_refused(conn: psycopg.Connection, window: int | None) -> None:
    """0 to 1 GiB: the window's bounds stay within bigint for any offset a seed may have."""
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_window_bytes must be between"):
        conn.execute("SELECT * FROM dlq_claim_fragment_chains(%s, '{}', %s)", (uuid.uuid4(), window))


def test_a_batch_is_claimed_only_in_read_committed(conn: psycopg.Connection, batch: psycopg.Connection[Any]) -> None:
    """The journal is committed after the claim: a transaction-long snapshot would keep it from the completion,
    every event of the batch would come back not_owned, and the batch be charged as a dead holder's."""
    events(conn, 2)
    batch.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    with pytest.raises(psycopg.errors.InvalidTransactionState, match="READ COMMITTED"):
        batch.execute(CLAIM, (uuid.uuid4(), 2))


def test_the_worker_claims_in_read_committed_whatever_the_database_default(
    conn: psycopg.Connection, db_url: str
) -> None:
    ids = events(conn, 30)
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET default_transaction_isolation = 'repeatable read'")
    report = process(db_url, WorkerConfig(batch_size=10, min_batch_size=10, max_batch_size=10))
    assert report.resolved == len(ids) and report.not_owned == 0
    assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE retry_count > 0").fetchone() == (0,)


def test_one_batch_per_transaction(conn: psycopg.Connection, batch: psycopg.Connection[Any]) -> None:
    """A second claim would take the transaction's own locked rows again, and one death would be charged twice."""
    events(conn, 4)
    first = uuid.uuid4()
    batch.execute(CLAIM, (first, 2))
    for lease in (uuid.uuid4(), first):  # another lease, or the same one again
        batch.execute("SAVEPOINT again")
        with pytest.raises(psycopg.errors.InvalidTransactionState, match="one batch per transaction"):
            batch.execute(CLAIM, (lease, 2))
        batch.execute("ROLLBACK TO SAVEPOINT again")


def test_a_lease_is_journalled_from_another_session_and_released_outside_a_batch(
    conn: psycopg.Connection, batch: psycopg.Connection[Any]
) -> None:
    """From the batch's own transaction the entry would die with it (a crash uncounted), and a release would
    charge the transaction's own locked rows with the dead ones."""
    events(conn, 2)
    lease = uuid.uuid4()
    ids = [i for (i,) in batch.execute(CLAIM, (lease, 2))]
    batch.execute("SAVEPOINT s")
    with pytest.raises(psycopg.errors.InvalidTransactionState, match="from another session"):
        batch.execute(JOURNAL, (lease, ids))
    batch.execute("ROLLBACK TO SAVEPOINT s")
    with pytest.raises(psycopg.errors.InvalidTransactionState, match="outside a batch transaction"):
        batch.execute("SELECT dlq_release_dead_batches()")


def test_a_lease_must_be_random(conn: psycopg.Connection, batch: psycopg.Connection[Any]) -> None:
    """The lock key is a lease's first 64 bits, which time-ordered (version 7) UUIDs made together share."""
    events(conn, 1)
    for lease in ("01890a5d-ac96-774b-bcce-b302099a8057", "00000000-0000-4000-0000-000000000000"):  # v7, no variant
        batch.execute("SAVEPOINT s")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="version 4"):
            batch.execute(CLAIM, (lease, 1))
        batch.execute("ROLLBACK TO SAVEPOINT s")


def test_a_journal_entry_needs_a_lease(other: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="a lease is required"):
        other.execute(JOURNAL, (None, [1]))


def test_a_lease_record_left_in_the_session_counts_for_no_other_transaction(
    conn: psycopg.Connection, batch: psycopg.Connection[Any], other: psycopg.Connection[Any]
) -> None:
    """A caller that keeps the record of a batch whose transaction ended, and sets it again, completes nothing."""
    events(conn, 2)
    lease, ids = claim(batch, other, 2)
    (record,) = batch.execute("SELECT current_setting('dlq.leases')").fetchone()
    batch.rollback()
    batch.execute("SELECT set_config('dlq.leases', %s, false)", (record,))
    states = batch.execute(
        "SELECT final_state FROM dlq_complete_batch(%s, %s, array_fill('resolved'::text, ARRAY[2]))", (lease, ids)
    ).fetchall()
    assert states == [("not_owned",), ("not_owned",)]
    batch.rollback()
    assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE resolved").fetchone() == (0,)


DIES_WITH_NEIGHBOURS = """
import os, sys
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.handlers import HandlerRegistry
from dlq_assets.core.processing.worker import Worker

class Dies:
    name = "dies"

    def handle(self, events, claimer):
        claimer.claim_neighbours_of(events, 8192)
        os._exit(3)  # the moment the neighbours are in hand

config = WorkerConfig(batch_size=1, min_batch_size=1, max_batch_size=1)
Worker(sys.argv[1], config, HandlerRegistry(default=Dies())).run()
"""


def test_a_worker_dying_with_neighbours_in_hand_has_them_on_record(conn: psycopg.Connection, db_url: str) -> None:
    """The neighbours' entry commits before the handler gets them (without waiting for its WAL flush, which the
    batch's own commit does): a worker killed then is charged for them too."""
    head_text = json.dumps({**VALID, "message": "first line"})[:-2]
    ids = []
    for offset, text in ((0, head_text), (len(head_text) + 1, 'second line"}')):
        metadata = Jsonb({"payload_form": "raw_text", "record_bytes": len(text.encode())})
        ids.append(insert_dead_letter(
            conn, {"raw_text": text}, reason="json_parse_error", source="/var/log/cowrie/cowrie.json",
            source_inode="7", source_offset=offset, metadata_json=metadata,
        ))  # fmt: skip
    died = subprocess.run(
        [sys.executable, "-c", DIES_WITH_NEIGHBOURS, db_url], capture_output=True, text=True, timeout=60
    )
    assert died.returncode == 3, died.stderr
    assert released_once_dead(conn) == 2
    charged = conn.execute(
        "SELECT array_agg(id ORDER BY id) FROM dead_letter_events WHERE error_history -> -1 ->> 'error_class' = "
        "'lease_expired'"
    ).fetchone()
    assert charged == (sorted(ids),)
