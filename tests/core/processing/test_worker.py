"""The Python worker against real PostgreSQL: repair and redrive, workers, crashes, signals, breaker, rate."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from dlq_assets.core import jsonutil
from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.core.processing import pool
from dlq_assets.core.processing.config import LEASE_MODES, WorkerConfig
from dlq_assets.core.processing.handlers import ClaimedEvent, Claimer, HandlerRegistry, Outcome, ReplayHandler, Target
from dlq_assets.core.processing.pacing import RateLimiter, next_batch_size
from dlq_assets.core.processing.pool import process
from dlq_assets.core.processing.worker import Worker
from dlq_assets.devtools.generator import write_corrupted_log
from tests.reliability.conftest import wait_until

SMALL = {"batch_size": 50, "min_batch_size": 10, "max_batch_size": 200}
VALID = {
    "eventid": "cowrie.session.connect",
    "timestamp": "2024-01-15T10:30:00.123456Z",
    "session": "3f2a9c0b1d4e",
    "src_ip": "203.0.113.10",
}


def states(conn: psycopg.Connection) -> dict[str, int]:
    row = conn.execute(
        """
        SELECT count(*) FILTER (WHERE resolved), count(*) FILTER (WHERE NOT resolved AND quarantined_at IS NULL),
               count(*) FILTER (WHERE quarantined_at IS NOT NULL),
               count(*) FILTER (WHERE processing_lock IS NOT NULL)  -- committed leases, and transaction leases:
               + (SELECT count(*) FROM dlq_batch_leases CROSS JOIN LATERAL unnest(event_ids)),
               (SELECT count(*) FROM dlq_poison_events)
          FROM dead_letter_events
        """
    ).fetchone()
    return dict(zip(("resolved", "pending", "quarantined", "leased", "poisoned"), row, strict=True))


def corpus(db_url: str, tmp_path: Path, n: int = 600, seed: int = 3) -> tuple[Path, list[Any]]:
    log = tmp_path / "cowrie.json"
    truth = write_corrupted_log(log, n_events=n, seed=seed, corruption_rate=0.5)
    ingest_paths([log], url=db_url)
    return log, truth


def insert_dead_letter(conn: psycopg.Connection, payload: Any, reason: str = "target_unavailable", **extra: Any) -> int:
    values = {"reason": reason, "payload": json.dumps(payload), **extra}
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    return conn.execute(
        f"INSERT INTO dead_letter_events ({names}) VALUES ({marks}) RETURNING id", list(values.values())
    ).fetchone()[0]


def test_a_corrupted_log_is_repaired_without_a_single_wrong_repair(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    _, truth = corpus(db_url, tmp_path)
    (backlog,) = conn.execute("SELECT count(*) FROM dead_letter_events").fetchone()
    (raw_before,) = conn.execute("SELECT count(*) FROM raw_events").fetchone()
    report = process(db_url, WorkerConfig(**SMALL))
    assert report.claimed == backlog and report.released == 0 and report.not_owned == 0
    after = states(conn)
    assert after["leased"] == 0
    assert after["resolved"] + after["pending"] + after["poisoned"] + after["quarantined"] == backlog
    assert after["resolved"] == report.resolved > 0
    # Every repaired event is exactly what Cowrie wrote at that position.
    originals = {t.offset: t.original for t in truth}
    repaired = conn.execute(
        "SELECT source_offset, payload::text, repair_strategy FROM raw_events WHERE dlq_event_id IS NOT NULL"
    ).fetchall()
    assert len(repaired) == conn.execute("SELECT count(*) FROM raw_events").fetchone()[0] - raw_before
    wrong = [off for off, text, _ in repaired if text != jsonutil.canonical_json(originals[off])]
    assert wrong == []
    assert {s for _, _, s in repaired} >= {"tokenizer_fix", "control_characters"}
    read_whole_at_ingest = ("clean", "pretty", "bom", "concatenated", "after_restart")
    recoverable = sum(1 for t in truth if t.recoverable and t.corruption not in read_whole_at_ingest)
    assert len(repaired) >= 0.9 * recoverable
    # The unrepairable ones wait with a clear error and a backoff; each batch wrote its metrics row.
    pending = conn.execute(
        "SELECT error_history -> -1 ->> 'error_class', next_attempt_at > now() FROM dead_letter_events "
        "WHERE NOT resolved AND quarantined_at IS NULL"
    ).fetchall()
    assert pending and all(cls == "unrepairable" and later for cls, later in pending)
    metrics = conn.execute(
        "SELECT count(*), sum(batch_size), sum(repaired_count), sum(failed_count) FROM dlq_processing_metrics"
    ).fetchone()
    assert metrics == (report.batches, backlog, report.resolved, report.failed)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_two_workers_never_process_an_event_twice_and_leave_none_behind(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_method: str
) -> None:
    monkeypatch.setattr(pool, "start_method", lambda: start_method)
    corpus(db_url, tmp_path, n=1500, seed=11)
    (backlog,) = conn.execute("SELECT count(*) FROM dead_letter_events").fetchone()
    report = process(db_url, WorkerConfig(batch_size=20, min_batch_size=10, max_batch_size=40), workers=2)
    assert report.processed == backlog  # each event got exactly one outcome, none was left behind
    assert report.peak_rss_mb > 0  # each worker reports its own peak (a forked one counts the pages it shares)
    if start_method == "spawn":
        assert report.peak_rss_mb < 200
    assert states(conn)["leased"] == 0
    (attempts,) = conn.execute("SELECT max(retry_count) FROM dead_letter_events").fetchone()
    assert attempts <= 1  # none failed twice: a fragment whose partner another worker held went back untouched
    shared = conn.execute(
        "SELECT e.id FROM dead_letter_events e, jsonb_array_elements(e.processing_attempts) a "
        "GROUP BY e.id, a ->> 'lease' HAVING count(*) > 1"
    ).fetchall()
    assert shared == []  # no lease ever took the same event twice
    sessions = conn.execute("SELECT count(DISTINCT processing_session_id) FROM dlq_processing_metrics").fetchone()[0]
    assert sessions == 2  # both workers took part
    dupes = conn.execute(
        "SELECT count(*) FROM (SELECT dlq_event_id FROM raw_events WHERE dlq_event_id IS NOT NULL "
        "GROUP BY 1 HAVING count(*) > 1) d"
    ).fetchone()[0]
    assert dupes == 0


def test_workers_are_forked_only_from_a_process_without_other_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool.threading, "active_count", lambda: 1)
    assert pool.start_method() == "fork"
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    monkeypatch.undo()
    other.start()
    try:
        assert pool.start_method() == "spawn"  # a fork would copy the locks the other thread may hold
    finally:
        release.set()
        other.join()


SLOW_WORKER = """
import sys, time
from dlq_assets.core.processing.handlers import CowrieRepairHandler, HandlerRegistry
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.worker import Worker

class Slow(CowrieRepairHandler):
    def handle(self, events, claimer):
        print("claimed", len(events), flush=True)
        time.sleep(float(sys.argv[2]))
        return super().handle(events, claimer)

config = WorkerConfig(batch_size=40, min_batch_size=10, max_batch_size=40, lease_seconds=int(sys.argv[3]),
                      lease_mode=sys.argv[4])
report = Worker(sys.argv[1], config, HandlerRegistry(default=Slow())).run()
print("report", report.stopped_by_signal, report.released, flush=True)
"""


def start_slow_worker(
    db_url: str, sleep: float, lease_seconds: int, lease_mode: str = "transaction"
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_WORKER), db_url, str(sleep), str(lease_seconds), lease_mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("claimed"), line
    return proc


@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_a_worker_killed_mid_batch_loses_nothing(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, lease_mode: str
) -> None:
    corpus(db_url, tmp_path, n=300, seed=5)
    (backlog,) = conn.execute("SELECT count(*) FROM dead_letter_events").fetchone()
    for _ in range(2):  # twice: a second crash on the re-claimed events too
        victim = start_slow_worker(db_url, sleep=60, lease_seconds=2, lease_mode=lease_mode)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        # a committed lease, or a transaction lease's journal entry: sent before the handler ran, committed by the
        # server whether or not the worker lived to read the answer
        wait_until(lambda: states(conn)["leased"] > 0, "the killed worker's batch on record", timeout=10)
        if lease_mode == "committed":
            time.sleep(2.5)  # the lease expires (a transaction lease ended with its connection)
    report = process(db_url, WorkerConfig(**SMALL))
    after = states(conn)
    assert after["leased"] == 0
    assert after["resolved"] + after["pending"] + after["poisoned"] + after["quarantined"] == backlog
    assert report.resolved > 0
    crashed = conn.execute(
        'SELECT count(*) FROM dead_letter_events WHERE error_history @> \'[{"error_class": "lease_expired"}]\''
    ).fetchone()[0]
    assert crashed > 0  # the crashes are on record as attempts
    dupes = conn.execute(
        "SELECT count(*) FROM (SELECT source, source_offset FROM raw_events GROUP BY 1, 2 HAVING count(*) > 1) d"
    ).fetchone()[0]
    assert dupes == 0


def test_sigterm_finishes_cleanly_and_releases_the_rest(db_url: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    corpus(db_url, tmp_path, n=300, seed=6)
    (backlog,) = conn.execute("SELECT count(*) FROM dead_letter_events").fetchone()
    slow = start_slow_worker(db_url, sleep=2, lease_seconds=600)
    slow.send_signal(signal.SIGTERM)
    out, _ = slow.communicate(timeout=60)
    assert slow.returncode == 0
    assert "report True" in out
    after = states(conn)
    assert after["leased"] == 0  # nothing half-done: the claimed batch was completed or released
    assert after["resolved"] + after["pending"] + after["poisoned"] + after["quarantined"] == backlog


class Slow:
    """Replays, but takes longer than the lease: only the heartbeat keeps the batch its own."""

    name = "slow"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def handle(self, events: Sequence[ClaimedEvent], claimer: Claimer) -> list[Outcome]:
        time.sleep(self.seconds)
        return ReplayHandler().handle(events, claimer)


@pytest.mark.parametrize("lease_mode", LEASE_MODES)
def test_the_heartbeat_keeps_a_long_batch_leased(db_url: str, conn: psycopg.Connection, lease_mode: str) -> None:
    for i in range(5):
        insert_dead_letter(conn, {**VALID, "n": i})
    config = WorkerConfig(**SMALL, lease_seconds=2, lease_mode=lease_mode)
    result: list[Any] = []
    slow = threading.Thread(
        target=lambda: result.append(Worker(db_url, config, HandlerRegistry(default=Slow(5))).run())
    )
    slow.start()
    time.sleep(3.5)  # past the lease: without heartbeats the events would be claimable again (or the server
    # would have ended the idle batch transaction)
    stolen = conn.execute("SELECT count(*) FROM dlq_claim_events(100, 60)").fetchone()[0]
    slow.join(30)
    assert stolen == 0
    (report,) = result
    assert (report.resolved, report.not_owned) == (5, 0)
    assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE error_history <> '[]'").fetchone() == (0,)


def test_a_tampered_payload_is_quarantined_not_processed(db_url: str, conn: psycopg.Connection) -> None:
    event_id = insert_dead_letter(conn, VALID)
    conn.execute(
        "UPDATE dead_letter_events SET payload = jsonb_set(payload, '{src_ip}', '\"198.51.100.66\"') WHERE id = %s",
        (event_id,),
    )
    report = process(db_url, WorkerConfig(**SMALL))
    assert report.quarantined == 1 and report.resolved == 0
    row = conn.execute(
        "SELECT classification, reason, quarantined_at IS NOT NULL FROM dead_letter_events WHERE id = %s", (event_id,)
    ).fetchone()
    assert row == ("tampered", "checksum_mismatch", True)
    assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == (0,)


def test_a_transient_failure_is_replayed_as_is(db_url: str, conn: psycopg.Connection) -> None:
    event_id = insert_dead_letter(conn, VALID, source="/var/log/cowrie.json", source_inode="7", source_offset=1234)
    report = process(db_url, WorkerConfig(**SMALL))
    assert (report.resolved, dict(report.strategies)) == (1, {"replay": 1})
    row = conn.execute("SELECT source_offset, dlq_event_id, repair_strategy, payload FROM raw_events").fetchone()
    assert row == (1234, event_id, "replay", VALID)


def test_a_transaction_lease_completes_its_rows_without_a_multixact(db_url: str, conn: psycopg.Connection) -> None:
    """The batch's transaction locks its rows and completes them at its own top level. Completed from a savepoint,
    each row's xmax became a MultiXact (the lock's transaction and the savepoint's), a row version PostgreSQL never
    takes as surely dead, so every claim fetched the resolved rows' stale index entries from the heap until VACUUM
    (one MultiXact a batch: 6 here instead of none)."""
    for i in range(300):
        insert_dead_letter(conn, {**VALID, "n": i})

    def next_multixact() -> int:
        conn.execute("CHECKPOINT")  # the counter as of now
        return int(conn.execute("SELECT next_multixact_id FROM pg_control_checkpoint()").fetchone()[0])

    before = next_multixact()
    report = process(db_url, WorkerConfig(**SMALL))
    assert report.resolved == 300
    assert next_multixact() == before


def test_a_position_already_in_raw_events_is_written_once(db_url: str, conn: psycopg.Connection) -> None:
    """Plain INSERT first, ON CONFLICT DO NOTHING again only on a conflict: the batch's other events are written,
    what is there stays, and the same event again is resolved by the row already there. An event whose position
    holds another's row (a different record claiming it, or the second of two twins in one batch) is not: its data
    would be nowhere. It fails as a refused write, kept for an operator."""
    at = {"source": "/var/log/cowrie.json", "source_inode": "7"}
    written = {**VALID, "n": "first"}
    conn.execute(
        "INSERT INTO raw_events (source, source_inode, source_offset, eventid, payload) VALUES (%s, %s, 1, %s, %s)",
        (at["source"], at["source_inode"], VALID["eventid"], json.dumps(written)),
    )
    for offset, n in ((1, "first"), (1, "again"), (2, "fresh"), (3, "twin a"), (3, "twin b")):
        insert_dead_letter(conn, {**VALID, "n": n}, source_offset=offset, **at)
    report = process(db_url, WorkerConfig(**SMALL))
    assert (report.resolved, report.retried) == (3, 2)
    rows = conn.execute("SELECT source_offset, payload ->> 'n' FROM raw_events ORDER BY source_offset").fetchall()
    assert rows[:2] == [(1, "first"), (2, "fresh")] and rows[2][0] == 3 and len(rows) == 3
    failed = conn.execute(
        "SELECT payload ->> 'n', error_history -> -1 ->> 'error_class' FROM dead_letter_events WHERE NOT resolved"
    ).fetchall()
    other_twin = ({"twin a", "twin b"} - {rows[2][1]}).pop()
    assert sorted(failed) == [("again", "target_write_failed"), (other_twin, "target_write_failed")]


def test_a_reason_without_a_handler_is_poisoned(db_url: str, conn: psycopg.Connection) -> None:
    insert_dead_letter(conn, {"anything": 1}, reason="some_other_pipeline")
    registry = HandlerRegistry(by_reason={"target_unavailable": ReplayHandler()}, default=None)
    report = Worker(db_url, WorkerConfig(**SMALL), registry).run()
    assert report.poisoned == 1
    assert conn.execute("SELECT poison_reason FROM dlq_poison_events").fetchone() == ("non_retryable:handler_missing",)


class Exploding:
    name = "exploding"

    def handle(self, events: Sequence[ClaimedEvent], claimer: Claimer) -> list[Outcome]:
        raise ConnectionError("downstream is down")


def test_the_breaker_stops_a_run_of_systemic_failures_and_denies_the_next_run(
    db_url: str, conn: psycopg.Connection
) -> None:
    for i in range(30):
        insert_dead_letter(conn, {**VALID, "n": i})
    config = WorkerConfig(**SMALL, breaker_threshold=5, breaker_timeout_seconds=300)
    report = Worker(db_url, config, HandlerRegistry(default=Exploding())).run()
    assert report.retried == 5 and report.released == 25  # consulted per event: stops at the threshold
    assert conn.execute("SELECT state FROM dlq_circuit_breaker_state").fetchone() == ("open",)
    history = conn.execute("SELECT error_history -> 0 ->> 'message' FROM dead_letter_events WHERE retry_count = 1")
    assert {m for (m,) in history} == {"ConnectionError: downstream is down"}
    again = Worker(db_url, config).run()
    assert again.breaker_denied and again.claimed == 0
    early = conn.execute(
        "SELECT batch_size, circuit_breaker_triggered FROM dlq_processing_metrics ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert early == (0, True)  # the early return writes its metrics row too


def test_a_half_open_breaker_lets_one_probe_through_and_closes_on_success(
    db_url: str, conn: psycopg.Connection
) -> None:
    for i in range(10):
        insert_dead_letter(conn, {**VALID, "n": i})
    conn.execute("SELECT dlq_breaker_configure('dlq_processing', 5, 60)")
    conn.execute("SELECT dlq_breaker_set('dlq_processing', 'open')")
    conn.execute("UPDATE dlq_circuit_breaker_state SET next_attempt_time = now() - interval '1 s'")
    report = process(db_url, WorkerConfig(**SMALL))
    first = conn.execute("SELECT batch_size FROM dlq_processing_metrics ORDER BY id LIMIT 1").fetchone()
    assert first == (1,)  # the probe batch holds exactly one event
    assert report.resolved == 10
    assert conn.execute("SELECT state FROM dlq_circuit_breaker_state").fetchone() == ("closed",)


class BadTarget:
    name = "bad_target"

    def handle(self, events: Sequence[ClaimedEvent], claimer: Claimer) -> list[Outcome]:
        event = {**VALID, "timestamp": "not a time"}
        return [Outcome(e.id, "resolved", "bad", target=Target(event, "s", "1", e.id, e.id, "bad")) for e in events]


def test_a_target_write_failure_fails_the_batch_for_retry(db_url: str, conn: psycopg.Connection) -> None:
    insert_dead_letter(conn, VALID)
    report = Worker(db_url, WorkerConfig(**SMALL), HandlerRegistry(default=BadTarget())).run()
    assert report.retried == 1 and report.resolved == 0
    cls = conn.execute("SELECT error_history -> -1 ->> 'error_class' FROM dead_letter_events").fetchone()
    assert cls == ("target_write_failed",)
    assert conn.execute("SELECT failure_count FROM dlq_circuit_breaker_state").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == (0,)


def test_priority_and_reason_filters_and_limit(db_url: str, conn: psycopg.Connection) -> None:
    for i in range(6):
        insert_dead_letter(conn, {**VALID, "n": i}, priority=1 + i % 3)
    insert_dead_letter(conn, {**VALID, "n": 99}, reason="timeout", priority=1)
    report = process(db_url, WorkerConfig(**SMALL, priority_max=2, reason="target_unavailable"))
    assert report.resolved == 4
    report = process(db_url, WorkerConfig(**SMALL, limit=2))
    assert report.claimed == 2
    assert states(conn)["pending"] == 1


def test_adaptive_batch_size_moves_toward_the_target_duration_within_bounds() -> None:
    config = WorkerConfig(batch_size=2000, min_batch_size=1000, max_batch_size=5000, target_batch_seconds=1.0)
    assert next_batch_size(2000, 0.5, config) == 3000  # fast: grow halfway toward 4000
    assert next_batch_size(2000, 4.0, config) == 1250  # slow: shrink halfway toward 500
    assert next_batch_size(4800, 0.1, config) == 5000
    assert next_batch_size(1000, 60.0, config) == 1000


def test_rate_limiter_pauses_every_n_events_and_caps_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # a virtual clock: the test neither waits nor depends on timing
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    limiter = RateLimiter(None, 100, 0.01)
    for _ in range(350):
        limiter.tick()
    assert sleeps == [0.01, 0.01, 0.01]
    capped = RateLimiter(1000.0, None, 0)
    start = clock[0]
    for _ in range(50):
        capped.tick()
    assert clock[0] - start == pytest.approx(0.05)  # 50 events at 1000/s take 50 ms, no more


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        WorkerConfig(batch_size=10, min_batch_size=1000)
    with pytest.raises(ValueError, match="priority_max"):
        WorkerConfig(priority_max=11)
    for budget in (0, -1, float("nan")):  # no budget at all would run nothing, or (0 read as unset) run unbounded
        with pytest.raises(ValueError, match="time_budget_seconds"):
            WorkerConfig(time_budget_seconds=budget)


@pytest.mark.parametrize("held", ["earlier", "later"])
def test_of_two_adjacent_fragments_held_apart_only_the_later_waits(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, held: str
) -> None:
    """Two workers each holding one of two adjacent cut records handed both back, batch after batch, and stopped with
    neither attempted. The later one waits for the earlier; the earlier is tried."""
    earlier = '{"eventid": "cowrie.session.connect", "timestamp": "2024-01-15T10:3'
    later = '{"eventid": "cowrie.login.failed", "session": "3f2a9c0b1d4e", "src_ip": "10.0.'
    log = tmp_path / "cowrie.json"
    log.write_text(f"{earlier}\n{later}\n")
    ingest_paths([log], url=db_url)
    offsets = {"earlier": 0, "later": len(earlier) + 1}
    conn.execute(  # another worker's live lease on one of them
        "UPDATE dead_letter_events SET processing_lock = gen_random_uuid(), lock_expires_at = now() + interval '1 hour'"
        " WHERE source_offset = %s",
        (offsets[held],),
    )
    report = Worker(db_url, WorkerConfig(**SMALL, lease_mode="committed", peer_wait_seconds=0.2)).run()
    free = "later" if held == "earlier" else "earlier"
    (retries,) = conn.execute(
        "SELECT retry_count FROM dead_letter_events WHERE source_offset = %s", (offsets[free],)
    ).fetchone()
    if free == "earlier":
        assert retries == 1 and report.released == 0  # tried: failed for now, a neighbour of the later one's retry
    else:
        assert retries == 0 and report.released == 1  # handed back untouched, to stitch once the earlier is done


@pytest.mark.parametrize("lease_mode", ["transaction", "committed"])
def test_a_worker_out_of_work_waits_for_the_batch_holding_the_earlier_fragment_and_attempts_the_later(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, lease_mode: str
) -> None:
    """The later of two adjacent cut records is handed back while another batch holds the earlier one. The worker
    then has nothing else to claim: it waits for that batch to end and claims again, rather than stop and leave
    the later one unattempted until the next run."""
    earlier = '{"eventid": "cowrie.session.connect", "timestamp": "2024-01-15T10:3'
    later = '{"eventid": "cowrie.login.failed", "session": "3f2a9c0b1d4e", "src_ip": "10.0.'
    log = tmp_path / "cowrie.json"
    log.write_text(f"{earlier}\n{later}\n")
    ingest_paths([log], url=db_url)
    conn.execute(  # another worker's batch holds the earlier one
        "UPDATE dead_letter_events SET processing_lock = gen_random_uuid(), lock_expires_at = now() + interval '1 hour'"
        " WHERE source_offset = 0"
    )
    worker = Worker(db_url, WorkerConfig(**SMALL, lease_mode=lease_mode))
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(worker.run)
        wait_until(lambda: conn.execute("SELECT count(*) FROM dlq_processing_metrics").fetchone()[0], "a first batch")
        time.sleep(0.3)
        assert not run.done()  # waiting, not stopped
        conn.execute(  # that batch ends: the earlier one failed for now
            "UPDATE dead_letter_events SET processing_lock = NULL, lock_expires_at = NULL, retry_count = 1,"
            " next_attempt_at = now() + interval '1 hour' WHERE source_offset = 0"
        )
        report = run.result(timeout=30)
    (retries,) = conn.execute("SELECT retry_count FROM dead_letter_events WHERE source_offset = %s",
                              (len(earlier) + 1,)).fetchone()  # fmt: skip
    assert retries == 1 and report.released == 1  # attempted once it could stitch or fail


@pytest.mark.parametrize("offset", [9223372036854775000, -9223372036854775000])
def test_a_forged_offset_is_no_fragment_and_fails_alone(conn: psycopg.Connection, db_url: str, offset: int) -> None:
    """A dead letter whose offset no file has (written by hand) seeds no neighbour claim and no probe, whose
    window arithmetic would leave bigint and fail its whole handler group: it fails alone, the record split into
    the two fragments beside it is stitched, and nothing is charged a handler error."""
    head_text = json.dumps({**VALID, "message": "first line"})[:-2]  # a newline inside the message split the record

    def fragment(text: str, at: int) -> int:
        metadata = Jsonb({"payload_form": "raw_text", "record_bytes": len(text.encode())})
        return insert_dead_letter(
            conn, {"raw_text": text}, "json_parse_error", source="/var/log/cowrie/cowrie.json", source_inode="7",
            source_offset=at, metadata_json=metadata,
        )  # fmt: skip

    head, tail = fragment(head_text, 0), fragment('second line"}', len(head_text) + 1)
    forged = fragment(head_text, offset)
    Worker(db_url, WorkerConfig(batch_size=10, min_batch_size=10, max_batch_size=10)).run()
    rows = conn.execute(
        "SELECT id, resolved, error_history -> -1 ->> 'error_class' FROM dead_letter_events WHERE id = ANY (%s)",
        ([head, tail, forged],),
    ).fetchall()
    ended = {event_id: (resolved, error) for event_id, resolved, error in rows}
    assert ended[head] == ended[tail] == (True, None)
    assert ended[forged] == (False, "unrepairable")
