"""Concurrency: four worker processes on a big backlog while another file is ingested and retention deletes
what they resolve, all at once. Nothing is lost, nothing is processed twice, nothing deadlocks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dlq_assets.core.intake.ingest import IngestReport, ingest_paths
from dlq_assets.core.operations.retention import RetentionReport, run_retention
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.pool import process
from dlq_assets.devtools.generator import write_corrupted_log
from tests.reliability.conftest import (
    SCALE,
    assert_ledger_holds,
    assert_processed_once_per_lease,
    take_ledger,
)

pytestmark = pytest.mark.reliability

BACKLOG = 20_000 * SCALE  # dead letters to start from (100k at DLQ_RELIABILITY_SCALE=5)
TIME_BOUND = 120 * SCALE  # seconds for the whole concurrent run: far beyond it means a wait that never ends


@pytest.mark.timeout(4 * TIME_BOUND)
def test_four_workers_ingest_and_retention_at_once(db_url: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    first, second = tmp_path / "backlog.json", tmp_path / "arriving.json"
    kinds = ("pretty", "truncated", "trailing_comma", "bad_escape", "split_line", "binary_junk", "missing_field")
    write_corrupted_log(
        first, n_events=round(BACKLOG / 0.54), seed=21, corruption_rate=0.7, kinds=(*kinds, "invalid_value")
    )
    write_corrupted_log(second, n_events=8_000 * SCALE, seed=22, corruption_rate=0.5, kinds=(*kinds, "concatenated"))
    ingest_paths([first], url=db_url)
    before = take_ledger(db_url)
    assert len(before.events) >= BACKLOG * 0.95

    done = threading.Event()
    errors: list[BaseException] = []
    arrived: list[IngestReport] = []
    retention: list[RetentionReport] = []

    def guarded(work: Callable[[], Any]) -> threading.Thread:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # reported below: a thread's exception must fail the test
                errors.append(exc)

        return threading.Thread(target=run, daemon=True)

    def retire() -> None:
        while not done.is_set():
            retention.append(run_retention(db_url, older_than_days=0, batch_size=500))
            done.wait(0.2)

    threads = [
        guarded(lambda: arrived.append(ingest_paths([second], url=db_url, batch_size=500))),
        guarded(retire),
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        report = process(db_url, WorkerConfig(batch_size=500, min_batch_size=100, max_batch_size=1000), workers=4)
    finally:
        done.set()
        for thread in threads:
            thread.join(TIME_BOUND)
    elapsed = time.monotonic() - started
    assert not [t for t in threads if t.is_alive()], "ingest or retention never finished"
    assert errors == []  # no deadlock_detected, no lock timeout escaped, no crash
    print(f"concurrent run: {elapsed:.1f} s, {report.batches} batches")
    assert elapsed < TIME_BOUND
    retention.append(run_retention(db_url, older_than_days=0, batch_size=500))  # and once more, on a quiet table

    after = take_ledger(db_url)
    counts = assert_ledger_holds(before, after, new_keys_ok=True, retired_ok=True)
    assert_processed_once_per_lease(conn)
    (arrival,) = arrived
    new_keys = after.tombstones.keys() - before.tombstones.keys()
    assert len(new_keys) == arrival.dlq_inserted and arrival.dlq_duplicates == 0
    source = str(second.resolve())
    assert {after.events[k].source for k in new_keys & after.events.keys()} <= {source}
    valid = "SELECT count(*) FROM raw_events WHERE source = %s AND dlq_event_id IS NULL"
    assert conn.execute(valid, (source,)).fetchone() == (arrival.raw_inserted,)
    # Retention deleted exactly the events missing now, all of them resolved, while the workers ran.
    retired = (before.tombstones.keys() | new_keys) - after.events.keys()
    assert counts["retired"] + len(new_keys - after.events.keys()) == len(retired)
    assert sum(r.rows_deleted for r in retention) == len(retired) > 0
    assert sum(r.rows_deleted for r in retention[:-1]) > 0  # some of it concurrently
    assert report.resolved > 0
    untouched = "SELECT count(*) FROM dead_letter_events WHERE processing_attempts = '[]' AND source <> %s"
    assert conn.execute(untouched, (source,)).fetchone() == (0,)  # the workers saw the whole backlog
    leased = conn.execute("SELECT count(*) FROM dead_letter_events WHERE processing_lock IS NOT NULL").fetchone()
    assert leased == (0,)
