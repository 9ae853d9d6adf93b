"""Batches of dead letters worked by the worker (``dlq_assets.core.processing.worker``).

No ``from __future__ import annotations``: Dagster reads the ``config`` and resource annotations at decoration time."""

import dagster as dg
from pydantic import Field

from dlq_assets.core.operations import health, inspect
from dlq_assets.defs.common import GROUP, POOL, markdown_table
from dlq_assets.defs.resources import CircuitBreaker, DLQDatabase
from dlq_assets.defs.schema.assets import dlq_schema


class ProcessingConfig(dg.Config):
    max_events: int | None = Field(default=None, ge=1, description="Stop after this many events (none: all due).")
    time_budget_seconds: float = Field(default=240, gt=0, le=3000, description="Stop claiming after this long.")
    workers: int = Field(default=1, ge=1, le=16, description="Worker processes.")
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    priority_max: int | None = Field(default=None, ge=1, le=10, description="Only this priority or higher.")
    reason: str | None = Field(default=None, description="Only dead letters with this reason.")
    max_events_per_second: float | None = Field(
        default=None, gt=0, description="Throttle: at most this many events per second per worker (spares the target)."
    )


@dg.asset(
    group_name=GROUP,
    kinds={"postgres", "python"},
    pool=POOL,
    deps=[dlq_schema],
    description=(
        "Batches of dead letters processed by the worker within an event and time budget: verified, repaired or "
        "replayed, written to raw_events, and resolved, retried, poisoned or quarantined."
    ),
)
def dlq_processed_batches(
    config: ProcessingConfig, database: DLQDatabase, breaker: CircuitBreaker
) -> dg.MaterializeResult:
    # Imported per run: loading the definitions does not import the worker.
    from dlq_assets.core.processing.config import WorkerConfig
    from dlq_assets.core.processing.pool import process

    with database.connect(autocommit=True) as conn:
        breaker.ensure(conn)
    report = process(
        database.resolved_url(),
        WorkerConfig(
            batch_size=config.batch_size, min_batch_size=min(config.batch_size, 1000),
            max_batch_size=max(config.batch_size, 5000), limit=config.max_events,
            time_budget_seconds=config.time_budget_seconds, priority_max=config.priority_max, reason=config.reason,
            breaker_name=breaker.name, max_events_per_second=config.max_events_per_second,
        ),
        workers=config.workers,
    )  # fmt: skip
    if report.infrastructure_error:  # the run shows red; the events wait, uncharged, behind the open breaker
        raise dg.Failure(
            description="processing stopped: infrastructure failure, breaker opened, no event charged an attempt",
            metadata={"error": report.infrastructure_error, "claimed": report.claimed},
        )
    with database.connect(autocommit=True) as conn:
        state = breaker.state(conn)
        backlog, by_reason = health.snapshot(conn), inspect.pending_by_reason(conn)
    strategies = sorted(report.strategies.items(), key=lambda kv: -kv[1])
    return dg.MaterializeResult(
        metadata={
            "processed": dg.MetadataValue.int(report.processed),
            "repaired": dg.MetadataValue.int(report.resolved),
            "failed": dg.MetadataValue.int(report.failed),
            "skipped": dg.MetadataValue.int(report.released),
            "quarantined": dg.MetadataValue.int(report.quarantined),
            "poisoned": dg.MetadataValue.int(report.poisoned),
            "batches": dg.MetadataValue.int(report.batches),
            "events_per_s": dg.MetadataValue.float(round(report.events_per_second, 1)),
            "breaker_state": dg.MetadataValue.text(state["state"]),
            "breaker_denied": dg.MetadataValue.bool(report.breaker_denied),
            "strategies": dg.MetadataValue.md(markdown_table(["method", "events"], strategies)),
            # The backlog after the run, as numbers the UI plots across materializations.
            "backlog_pending": dg.MetadataValue.int(backlog.pending_events),
            "backlog_oldest_age_seconds": dg.MetadataValue.float(round(backlog.backlog_age_seconds or 0.0, 1)),
            "backlog_poisoned": dg.MetadataValue.int(backlog.poisoned_events),
            "backlog_quarantined": dg.MetadataValue.int(backlog.quarantined_events),
            "backlog_resolution_rate": dg.MetadataValue.float(round(backlog.recent_success_rate or 0.0, 4)),
            "backlog_pending_by_reason": dg.MetadataValue.json(by_reason),
        }
    )
