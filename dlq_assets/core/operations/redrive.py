"""Redrive: send poisoned events back to processing, a batch per transaction, paced, never in a cycle."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from dlq_assets.core.db import database_url


@dataclass
class RedriveReport:
    dry_run: bool
    redriven: list[int] = field(default_factory=list)  # moved back (or, in a dry run, that would be)
    kept: dict[int, str] = field(default_factory=dict)  # selected but redriven too often already
    batches: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "redriven_count": len(self.redriven), "kept_count": len(self.kept)}


def redrive(
    url: str | None = None,
    *,
    ids: Sequence[int] | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    max_redrives: int = 3,
    batch_size: int = 500,
    max_per_second: float | None = None,
    limit: int | None = None,
    dry_run: bool = False,
) -> RedriveReport:
    """Move poisoned events selected by ids, reason or poisoning time back to the queue.

    Each batch commits on its own; ``max_per_second`` (0.001 to 1e9) paces them so a redrive does not flood the
    workers.
    An event already redriven ``max_redrives`` times stays in the poison table (cycle protection).
    """
    if ids is None and reason is None and since is None and until is None:
        raise ValueError("choose what to redrive: ids, a reason, or a time range")
    if not 1 <= batch_size <= 100_000 or max_redrives < 0 or (limit is not None and limit < 1):
        raise ValueError("batch_size must be 1..100000, max_redrives >= 0, limit >= 1")
    if max_per_second is not None and not 0.001 <= max_per_second <= 1e9:  # also refuses nan
        raise ValueError("max_per_second must be between 0.001 and 1e9")
    selection = (list(ids) if ids is not None else None, reason, since, until)
    report = RedriveReport(dry_run=dry_run)
    started = time.monotonic()
    with psycopg.connect(database_url(url), autocommit=True) as conn:
        candidates = conn.execute(
            "SELECT * FROM dlq_redrive_candidates(%s, %s, %s, %s, %s)", (*selection, max_redrives)
        )
        for event_id, action in candidates.fetchall():
            if action.startswith("kept"):
                report.kept[event_id] = action
            elif dry_run:
                report.redriven.append(event_id)
        if dry_run:
            report.redriven = report.redriven[:limit] if limit else report.redriven
            report.seconds = time.monotonic() - started
            return report
        while limit is None or len(report.redriven) < limit:
            size = batch_size if limit is None else min(batch_size, limit - len(report.redriven))
            moved = [
                row[0]
                for row in conn.execute(
                    "SELECT event_id FROM dlq_redrive(%s, %s, %s, %s, %s, %s)", (*selection, size, max_redrives)
                ).fetchall()
            ]
            report.batches += 1
            report.redriven.extend(moved)
            if len(moved) < size:
                break
            if max_per_second:
                ahead = len(report.redriven) / max_per_second - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    report.seconds = time.monotonic() - started
    return report
