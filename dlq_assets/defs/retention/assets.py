"""Retention, run by ``dlq_assets.core.operations.retention``.

No ``from __future__ import annotations``: Dagster reads the ``config`` and resource annotations at decoration time."""

import dagster as dg
from pydantic import Field

from dlq_assets.core.operations.retention import run_retention
from dlq_assets.defs.common import GROUP, POOL, markdown_table
from dlq_assets.defs.processing.assets import dlq_processed_batches
from dlq_assets.defs.resources import DLQDatabase


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
            "partitions_kept": dg.MetadataValue.md(markdown_table(["partition", "kept because"], kept)),
            "oldest_remaining": dg.MetadataValue.text(
                report.oldest_remaining.isoformat() if report.oldest_remaining else "none"
            ),
            "analyzed": dg.MetadataValue.bool(report.analyzed),
        }
    )
