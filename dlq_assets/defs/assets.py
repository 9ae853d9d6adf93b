"""Software-defined assets over the DLQ: its schema, partitions, processed batches, failure patterns, retention."""

import base64
from datetime import UTC, datetime

import dagster as dg
from pydantic import Field

from dlq_assets.core.migrations import applied_versions, migrate
from dlq_assets.defs.resources import CircuitBreaker, DLQDatabase

GROUP = "dlq"
POOL = "dlq_database"  # dagster.yaml limits how many steps touch the DLQ database at once
MONTHLY = dg.MonthlyPartitionsDefinition(start_date="2024-01-01", timezone="UTC", end_offset=1)


def _table(headers: list[str], rows: list[tuple[object, ...]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dg.asset(
    group_name=GROUP,
    kinds={"postgres", "sql"},
    pool=POOL,
    description="The DLQ schema in PostgreSQL: every migration in sql/ applied, in order, each once.",
)
def dlq_schema(database: DLQDatabase) -> dg.MaterializeResult:
    applied = migrate(database.resolved_url())
    with database.connect() as conn:
        versions = applied_versions(conn)
    return dg.MaterializeResult(
        metadata={
            "schema_version": dg.MetadataValue.int(max(versions, default=0)),
            "applied_this_run": dg.MetadataValue.int(len(applied)),
            "migrations": dg.MetadataValue.md(
                _table(["version", "migration"], [(v, n) for v, (n, _) in versions.items()])
            ),
        }
    )


class PartitionsConfig(dg.Config):
    months_ahead: int = Field(default=3, ge=0, le=24, description="Months of partitions to create ahead.")


@dg.asset(
    group_name=GROUP,
    kinds={"postgres"},
    pool=POOL,
    deps=[dlq_schema],
    partitions_def=MONTHLY,
    description="Monthly range partitions of dead_letter_events, one per Dagster partition, created ahead of time.",
)
def dlq_partitions(
    context: dg.AssetExecutionContext, config: PartitionsConfig, database: DLQDatabase
) -> dg.MaterializeResult:
    month = datetime.strptime(context.partition_key, "%Y-%m-%d").replace(tzinfo=UTC)
    with database.connect(autocommit=True) as conn:
        created = [
            r[0] for r in conn.execute("SELECT * FROM dlq_ensure_partitions(%s, %s)", (month, config.months_ahead))
        ]
        (name,) = conn.execute("SELECT dlq_partition_name(%s)", (month,)).fetchone()
        (rows,) = conn.execute(
            "SELECT count(*) FROM dead_letter_events WHERE created_at >= %s AND created_at < %s + interval '1 month'",
            (month, month),
        ).fetchone()
        partitions = conn.execute(
            "SELECT partition_name, estimated_rows, pg_size_pretty(total_bytes) FROM dlq_partitions ORDER BY 1"
        ).fetchall()
    return dg.MaterializeResult(
        metadata={
            "partition": dg.MetadataValue.text(name),
            "rows": dg.MetadataValue.int(rows),
            "created": dg.MetadataValue.json(created),
            "partitions": dg.MetadataValue.md(_table(["partition", "estimated rows", "size"], partitions)),
        }
    )


class ProcessingConfig(dg.Config):
    max_events: int | None = Field(default=None, ge=1, description="Stop after this many events (none: all due).")
    time_budget_seconds: float = Field(default=240, gt=0, description="Stop claiming after this long.")
    workers: int = Field(default=1, ge=1, le=16, description="Worker processes.")
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    priority_max: int | None = Field(default=None, ge=1, le=10, description="Only this priority or higher.")
    reason: str | None = Field(default=None, description="Only dead letters with this reason.")


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
    from dlq_assets.core.processing.worker import WorkerConfig, process

    with database.connect(autocommit=True) as conn:
        breaker.ensure(conn)
    report = process(
        database.resolved_url(),
        WorkerConfig(
            batch_size=config.batch_size, min_batch_size=min(config.batch_size, 1000),
            max_batch_size=max(config.batch_size, 5000), limit=config.max_events,
            time_budget_seconds=config.time_budget_seconds, priority_max=config.priority_max, reason=config.reason,
            breaker_name=breaker.name,
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
            "strategies": dg.MetadataValue.md(_table(["method", "events"], strategies)),
        }
    )


class AnalysisConfig(dg.Config):
    since_hours: float | None = Field(default=None, gt=0, description="Only dead letters created this recently.")
    top: int = Field(default=10, ge=1, le=100)


@dg.asset(
    group_name=GROUP,
    kinds={"pandas", "postgres"},
    pool=POOL,
    deps=[dlq_processed_batches],
    description="Failure patterns: dead letters by reason, source, error class, repair strategy and hour.",
)
def dlq_failure_patterns(config: AnalysisConfig, database: DLQDatabase) -> dg.MaterializeResult:
    from datetime import timedelta

    from dlq_assets.core.operations.analysis import analyze, chart_png

    since = datetime.now(UTC) - timedelta(hours=config.since_hours) if config.since_hours else None
    with database.connect() as conn:
        patterns = analyze(conn, since=since, top=config.top)
    chart = base64.b64encode(chart_png(patterns)).decode("ascii")
    metadata: dict[str, dg.MetadataValue] = {
        name: dg.MetadataValue.float(float(value)) if isinstance(value, float) else dg.MetadataValue.int(int(value))
        for name, value in patterns.summary().items()
    }
    metadata["patterns"] = dg.MetadataValue.md(patterns.as_markdown(limit=config.top))
    metadata["chart"] = dg.MetadataValue.md(f"![failures by hour and error class](data:image/png;base64,{chart})")
    return dg.MaterializeResult(metadata=metadata)


class RetentionConfig(dg.Config):
    older_than_days: int = Field(default=90, ge=0, description="Resolved events older than this are deleted.")
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    drop_partitions: bool = Field(default=True, description="Drop months that are wholly resolved and expired.")
    dry_run: bool = Field(default=False, description="Report what would happen; change nothing.")


@dg.asset(
    group_name=GROUP,
    kinds={"postgres"},
    pool=POOL,
    deps=[dlq_processed_batches],
    description="Retention: resolved events past the retention period deleted in batches, expired months dropped.",
)
def dlq_retention_state(config: RetentionConfig, database: DLQDatabase) -> dg.MaterializeResult:
    from dlq_assets.core.operations.retention import run_retention

    report = run_retention(
        database.resolved_url(), older_than_days=config.older_than_days, batch_size=config.batch_size,
        dry_run=config.dry_run, drop_partitions=config.drop_partitions,
    )  # fmt: skip
    kept = sorted(report.partitions_kept.items())
    return dg.MaterializeResult(
        metadata={
            "dry_run": dg.MetadataValue.bool(report.dry_run),
            "rows_deleted": dg.MetadataValue.int(report.rows_deleted),
            "rows_per_second": dg.MetadataValue.float(round(report.rows_per_second, 1)),
            "longest_batch_ms": dg.MetadataValue.float(round(report.longest_batch_seconds * 1000, 1)),
            "partitions_dropped": dg.MetadataValue.json(report.partitions_dropped),
            "partitions_kept": dg.MetadataValue.md(_table(["partition", "kept because"], kept)),
            "oldest_remaining": dg.MetadataValue.text(
                report.oldest_remaining.isoformat() if report.oldest_remaining else "none"
            ),
            "analyzed": dg.MetadataValue.bool(report.analyzed),
        }
    )


dlq_assets_all = [dlq_schema, dlq_partitions, dlq_processed_batches, dlq_failure_patterns, dlq_retention_state]
