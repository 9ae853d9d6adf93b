"""Crashes: workers killed or cut off at every step of a batch, PostgreSQL restarted under a worker, an ingest
killed mid-file, PostgreSQL crashed under an ingest. After each, a fresh run finishes the work and the ledger holds."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dlq_assets.core import jsonutil
from dlq_assets.core.db import ensure_database
from dlq_assets.core.intake.ingest import _RawRow, ingest_paths, is_cut_record, is_event, route
from dlq_assets.core.intake.reader import read_file
from dlq_assets.core.migrations import migrate
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.handlers import ClaimedEvent, Claimer, HandlerRegistry, Outcome, ReplayHandler
from dlq_assets.core.processing.pool import process
from dlq_assets.core.processing.worker import Worker
from dlq_assets.devtools.embedded import EmbeddedServer, remove_cluster
from dlq_assets.devtools.generator import write_corrupted_log
from tests.conftest import cluster_dir
from tests.reliability.conftest import (
    SCALE,
    VALID,
    assert_ledger_holds,
    assert_processed_once_per_lease,
    backends,
    insert_dead_letter,
    start_ingest,
    start_worker,
    stopped_at,
    take_ledger,
    wait_until,
    with_params,
)

pytestmark = pytest.mark.reliability

STEPS = {  # where a worker can be stopped and killed, by lease mode
    "committed": ("handler", "target_write", "complete", "commit"),
    "transaction": ("handler", "target_write", "commit"),
}
MODE_STEPS = [(mode, step) for mode, steps in STEPS.items() for step in steps]
CLEAN = WorkerConfig(batch_size=50, min_batch_size=10, max_batch_size=200)
LEASE_EXPIRY = 1.2  # the victims' lease is 1 s


def backlog(url: str, tmp_path: Path, n: int = 400 * SCALE, seed: int = 5) -> None:
    """A corrupted Cowrie log, ingested, plus one replayable event at priority 1: every first batch holds it,
    so every first batch has a target to write."""
    log = tmp_path / "cowrie.json"
    write_corrupted_log(log, n_events=n, seed=seed, corruption_rate=0.5)
    ingest_paths([log], url=url)
    with psycopg.connect(url, autocommit=True) as conn:
        insert_dead_letter(conn, VALID, source="/sentinel.json", source_inode="1", source_offset=0, priority=1)


def due(conn: psycopg.Connection[Any]) -> int:
    return conn.execute(
        "SELECT count(*) FROM dead_letter_events WHERE NOT resolved AND quarantined_at IS NULL "
        "AND next_attempt_at <= now()"
    ).fetchone()[0]


def crash_on_record(conn: psycopg.Connection[Any], ids: list[int]) -> set[int]:
    """Ids whose history (in either table) holds the failed attempt a dead lease counts as."""
    rows = conn.execute(
        "SELECT id FROM dead_letter_events WHERE id = ANY (%(ids)s) AND error_history @> %(crash)s "
        "UNION SELECT id FROM dlq_poison_events WHERE id = ANY (%(ids)s) AND error_history @> %(crash)s",
        {"ids": ids, "crash": '[{"error_class": "lease_expired"}]'},
    )
    return {i for (i,) in rows}


@pytest.mark.parametrize("lease_mode", STEPS)
def test_sigkill_at_every_step_again_and_again_loses_nothing(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, lease_mode: str
) -> None:
    backlog(db_url, tmp_path)
    before = take_ledger(db_url)
    held: list[int] = []
    steps = STEPS[lease_mode]
    for step in (*steps, *steps, "anywhere"):
        if step == "anywhere":  # last, as it may finish the backlog: a free-running worker killed at random
            victim = start_worker(db_url, gate="0", batch=2, lease_mode=lease_mode)
            time.sleep(random.Random(7).uniform(0.02, 0.2))
            victim.kill()
        else:
            victim = start_worker(db_url, lease_mode=lease_mode)
            with stopped_at(db_url, step, victim):
                victim.kill()
            held += victim.ids
        wait_until(lambda app=victim.app: not backends(conn, app), "the killed worker's sessions to end")
        time.sleep(LEASE_EXPIRY)
    report = process(db_url, CLEAN)
    counts = assert_ledger_holds(before, take_ledger(db_url))
    assert_processed_once_per_lease(conn)
    assert report.resolved > 0 and counts["resolved"] > 0
    assert due(conn) == 0  # the clean worker finished
    assert crash_on_record(conn, held) == set(held)  # every event a killed lease held lost an attempt, nothing else


@pytest.mark.parametrize(("lease_mode", "step"), MODE_STEPS)
def test_a_terminated_worker_connection_loses_nothing(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, lease_mode: str, step: str
) -> None:
    backlog(db_url, tmp_path, n=200 * SCALE)
    before = take_ledger(db_url)
    victim = start_worker(db_url, lease_mode=lease_mode)
    with stopped_at(db_url, step, victim):
        pids = backends(conn, victim.app)  # found by application_name in pg_stat_activity
        assert pids
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        if step == "handler":
            victim.go()
    assert victim.reap() != 0  # it stopped on the lost connection, whatever it was doing
    # A lost connection is the infrastructure's failure, not the events': the breaker opens, no attempt is charged.
    assert conn.execute("SELECT state FROM dlq_circuit_breaker_state").fetchone() == ("open",)
    assert crash_on_record(conn, victim.ids) == set()
    conn.execute("SELECT dlq_breaker_set('dlq_processing', 'reset')")  # the operator, once the cause is fixed
    time.sleep(LEASE_EXPIRY)
    process(db_url, CLEAN)
    assert_ledger_holds(before, take_ledger(db_url))
    assert_processed_once_per_lease(conn)
    assert due(conn) == 0


@contextmanager
def own_server() -> Iterator[tuple[EmbeddedServer, str]]:
    """A migrated database on a cluster of the test's own, to stop and start (removed afterwards)."""
    data_dir = cluster_dir()
    server = EmbeddedServer(data_dir)
    try:
        ensure_database(server.start().url(), "dlq")
        url = server.status().url("dlq")
        migrate(url)
        yield server, url
    finally:
        remove_cluster(data_dir)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("lease_mode", STEPS)
def test_a_postgres_restart_mid_run_loses_nothing(tmp_path: Path, lease_mode: str) -> None:
    with own_server() as (server, url):
        backlog(url, tmp_path)
        before = take_ledger(url)
        for gate, batch, pause in (("1", 40, 0.0), ("0", 10, 0.2)):  # in a handler; then at a random point
            victim = start_worker(url, gate=gate, batch=batch, lease_mode=lease_mode)
            time.sleep(pause)
            server.stop(mode="immediate")
            server.start()
            victim.reap()  # it stops on the broken connection; it cannot finish the batch it held
            with psycopg.connect(url, autocommit=True) as conn:  # the breaker it opened, reset by the operator
                conn.execute("SELECT dlq_breaker_set('dlq_processing', 'reset')")
        time.sleep(LEASE_EXPIRY)
        process(url, CLEAN)
        counts = assert_ledger_holds(before, take_ledger(url))
        assert counts["resolved"] > 0
        with psycopg.connect(url) as conn:
            assert_processed_once_per_lease(conn)
            assert due(conn) == 0


_STORED = """SELECT (SELECT count(*) FROM raw_events WHERE source = %(s)s),
                     (SELECT count(*) FROM dead_letter_events WHERE source = %(s)s)"""


def stored(url: str, source: str) -> int:
    with psycopg.connect(url) as conn:
        return sum(conn.execute(_STORED, {"s": source}).fetchone())


def assert_resumed_to_exactly_once(url: str, log: Path, partial: int) -> None:
    """A fresh ingest of ``log``, of which ``partial`` records are stored, writes the rest and nothing twice."""
    source = str(log.resolve())
    expected = {record.offset: route(record) for record in read_file(log, accept=is_event, is_cut=is_cut_record)}
    assert partial < len(expected)  # stopped mid-file

    report = ingest_paths([log], url=url, batch_size=500)
    assert report.records == len(expected)
    assert report.raw_duplicates + report.dlq_duplicates == partial  # the committed part is not written again
    assert report.raw_inserted + report.dlq_inserted == len(expected) - partial
    with psycopg.connect(url) as conn:
        raw = conn.execute("SELECT source_offset, payload_checksum FROM raw_events WHERE source = %s", (source,))
        raw_rows = raw.fetchall()
        dead = conn.execute("SELECT source_offset, payload_checksum FROM dead_letter_events WHERE source = %s",
                            (source,))  # fmt: skip
        dead_rows = dead.fetchall()
    assert len(raw_rows) + len(dead_rows) == len(expected)  # every record once
    assert dict(raw_rows) == {
        offset: jsonutil.payload_checksum(r.event) for offset, r in expected.items() if isinstance(r, _RawRow)
    }
    assert dict(dead_rows) == {
        offset: jsonutil.payload_checksum(r.payload) for offset, r in expected.items() if not isinstance(r, _RawRow)
    }


def test_an_ingest_killed_mid_file_resumes_to_exactly_once(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    log = tmp_path / "big.json"
    write_corrupted_log(log, n_events=20_000 * SCALE, seed=8, corruption_rate=0.3)
    source = str(log.resolve())
    proc = start_ingest(with_params(db_url, application_name="dlq-ingest-victim"), str(log), 500)
    wait_until(lambda: stored(db_url, source) >= 1000, "the first ingest batches to commit")
    proc.kill()
    proc.wait(30)
    wait_until(lambda: not backends(conn, "dlq-ingest-victim"), "the killed ingest's session to end")
    partial = stored(db_url, source)
    assert partial >= 1000  # what was committed stays: the server lives on
    assert_resumed_to_exactly_once(db_url, log, partial)


@pytest.mark.timeout(300)
def test_a_postgres_crash_mid_ingest_fails_it_and_a_rerun_stores_every_record_once(tmp_path: Path) -> None:
    """Batches before a file's last commit without waiting for their WAL flush: a server crash (no shutdown
    checkpoint) may undo some the ingest counted, or all. The ingest fails on its broken connection, and ingesting the
    file again stores exactly what the crash left out."""
    with own_server() as (server, url):
        log = tmp_path / "big.json"
        write_corrupted_log(log, n_events=20_000 * SCALE, seed=9, corruption_rate=0.3)
        source = str(log.resolve())
        proc = start_ingest(url, str(log), 500)
        wait_until(lambda: stored(url, source) >= 1000, "the first ingest batches to commit")
        server.stop(mode="immediate")
        assert proc.wait(60) != 0  # the ingest stops with its connection's error
        server.start()
        assert_resumed_to_exactly_once(url, log, stored(url, source))


COMMITTED = WorkerConfig(batch_size=50, min_batch_size=10, max_batch_size=200, lease_mode="committed")


class LosesItsLease:
    """Replays, but while it works its lease runs out (a long GC pause, a VM freeze, a partition), the payload
    is tampered with, and another worker takes the event over and quarantines it."""

    name = "loses_its_lease"

    def __init__(self, url: str) -> None:
        self.url = url
        self.other: Any = None

    def handle(self, events: list[ClaimedEvent], claimer: Claimer) -> list[Outcome]:
        outcomes = ReplayHandler().handle(events, claimer)
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "UPDATE dead_letter_events SET lock_expires_at = now() - interval '1 second', "
                'payload = payload || \'{"src_ip": "198.51.100.66"}\''
            )
        self.other = Worker(self.url, CLEAN).run()
        return outcomes

    # A committed lease: a transaction lease cannot run out under a live transaction, and only the session
    # holding it completes its rows (tests/test_transaction_leases.py).


def test_a_worker_that_lost_its_lease_writes_nothing(db_url: str, conn: psycopg.Connection) -> None:
    insert_dead_letter(conn, VALID, source="/var/log/cowrie.json", source_inode="7", source_offset=10)
    before = take_ledger(db_url)
    handler = LosesItsLease(db_url)
    report = Worker(db_url, COMMITTED, HandlerRegistry(default=handler)).run()
    assert (report.not_owned, handler.other.quarantined) == (1, 1)  # fenced: its completion changed nothing
    (key,) = before.events
    after = take_ledger(db_url)
    assert after.events[key].state == "quarantined"
    assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == (0,)  # ...and neither did its write
    assert_ledger_holds(before, after, tampered=frozenset({key}))
