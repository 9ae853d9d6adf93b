"""Retention: retire resolved dead letters once they are older than the retention period.

Row deletes run one batch per transaction (the SQL function deletes one batch and this loop commits between
calls), so no transaction holds row locks for long, and a batch skips rows a worker has locked instead of
waiting for them. Whole expired monthly partitions are then detached and dropped. Idempotency keys stay behind
as tombstones. A dry run only counts, on a read-only session, so it cannot write even by mistake.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from dlq_assets.core.db import database_url

MAX_BATCH_SIZE = 100_000  # the SQL function's own limit
_DROP_PARTITIONS = "SELECT partition_name, rows, action FROM dlq_retention_drop_partitions(%s)"
_OLDEST_RESOLVED = "SELECT min(resolved_at) FROM dead_letter_events WHERE resolved AND quarantined_at IS NULL"


@dataclass(frozen=True)
class RetentionReport:
    """What a run did; for a dry run, what a real run with the same arguments would do.

    rows_deleted counts the batched deletes; rows still in a partition when it is dropped (only when
    max_batches stopped the batches early) are not included. oldest_remaining is the oldest resolved_at
    left among resolved, non-quarantined events (for a dry run: as it is now). rows_per_second is 0 for a dry run.
    longest_batch_seconds is the longest single delete batch: the longest any of its row locks was held (0 for a
    dry run).
    """

    dry_run: bool
    older_than_days: int
    rows_deleted: int
    batches: int
    partitions_dropped: list[str]
    partitions_kept: dict[str, str]
    seconds: float
    rows_per_second: float
    longest_batch_seconds: float
    analyzed: bool
    oldest_remaining: datetime | None


def run_retention(
    url: str | None = None,
    *,
    older_than_days: int = 90,
    batch_size: int = 1000,
    dry_run: bool = False,
    drop_partitions: bool = True,
    max_batches: int | None = None,
    analyze_threshold: int = 10_000,
) -> RetentionReport:
    """Delete expired resolved events batch by batch, drop expired partitions, then ANALYZE after big changes."""
    if older_than_days < 0:
        raise ValueError(f"older_than_days must be 0 or more, got {older_than_days}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1 (or None for no limit), got {max_batches}")
    if analyze_threshold < 0:
        raise ValueError(f"analyze_threshold must be 0 or more, got {analyze_threshold}")
    started = time.perf_counter()
    with psycopg.connect(database_url(url), autocommit=True) as conn:
        if dry_run:
            conn.execute("SET default_transaction_read_only = on")
            rows_deleted, batches, partitions = _preview(conn, older_than_days, batch_size, max_batches)
            longest = 0.0
        else:
            rows_deleted, batches, longest = _delete_batches(conn, older_than_days, batch_size, max_batches)
            partitions = conn.execute(_DROP_PARTITIONS, (older_than_days,)).fetchall() if drop_partitions else []
        if not drop_partitions:
            partitions = []  # a dry run still previews them, for the eligible row count
        dropped = [(name, rows) for name, rows, action in partitions if action in ("dropped", "would drop")]
        analyzed = not dry_run and rows_deleted + sum(rows or 0 for _, rows in dropped) >= analyze_threshold
        if analyzed:
            conn.execute("ANALYZE dead_letter_events")
        (oldest,) = conn.execute(_OLDEST_RESOLVED).fetchone() or (None,)
    seconds = time.perf_counter() - started
    return RetentionReport(
        dry_run=dry_run,
        older_than_days=older_than_days,
        rows_deleted=rows_deleted,
        batches=batches,
        partitions_dropped=[name for name, _ in dropped],
        partitions_kept={
            name: action.removeprefix("kept: ") for name, _, action in partitions if action.startswith("kept")
        },
        seconds=seconds,
        rows_per_second=0.0 if dry_run or seconds <= 0 else rows_deleted / seconds,
        longest_batch_seconds=longest,
        analyzed=analyzed,
        oldest_remaining=oldest,
    )


def _delete_batches(
    conn: psycopg.Connection[Any], older_than_days: int, batch_size: int, max_batches: int | None
) -> tuple[int, int, float]:
    """One autocommit call (one transaction) per batch, until a batch comes back short or the cap is reached;
    (rows, batches, the longest batch's seconds)."""
    deleted = batches = 0
    longest = 0.0
    while max_batches is None or batches < max_batches:
        started = time.perf_counter()
        sql = "SELECT cleanup_resolved_dlq_events_enhanced(%s, %s)"
        (n,) = conn.execute(sql, (older_than_days, batch_size)).fetchone() or (0,)
        longest = max(longest, time.perf_counter() - started)
        batches += 1
        deleted += n
        if n < batch_size:
            break
    return deleted, batches, longest


def _preview(
    conn: psycopg.Connection[Any], older_than_days: int, batch_size: int, max_batches: int | None
) -> tuple[int, int, list[tuple[str, int | None, str]]]:
    """The batch loop's row and batch counts, and each partition's fate, computed without writing."""
    rows = conn.execute(
        "SELECT partition_name, rows, eligible_rows, action FROM dlq_retention_preview(%s)", (older_than_days,)
    ).fetchall()
    eligible = sum(r[2] for r in rows)
    batches = eligible // batch_size + 1  # the loop stops at the first short batch, which may be empty
    if max_batches is not None:
        batches = min(batches, max_batches)
        eligible = min(eligible, max_batches * batch_size)
    return eligible, batches, [(name, n, action) for name, n, _, action in rows]
