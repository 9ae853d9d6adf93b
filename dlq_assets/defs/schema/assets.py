"""The schema and the monthly partitions of ``dead_letter_events``.

No ``from __future__ import annotations``: Dagster reads the ``config`` and resource annotations at decoration time."""

from datetime import UTC, datetime

import dagster as dg
import psycopg
from pydantic import Field

from dlq_assets.core.migrations import MigrationError, applied_versions, migrate
from dlq_assets.core.operations.partitions import ensure_month
from dlq_assets.defs.common import GROUP, POOL, markdown_table
from dlq_assets.defs.resources import DLQDatabase, database_failure

MONTHLY = dg.MonthlyPartitionsDefinition(start_date="2024-01-01", timezone="UTC", end_offset=1)


@dg.asset(
    group_name=GROUP,
    kinds={"postgres", "sql"},
    pool=POOL,
    description="The DLQ schema in PostgreSQL: every migration in sql/ applied, in order, each once.",
)
def dlq_schema(database: DLQDatabase) -> dg.MaterializeResult:
    url = database.resolved_url()
    try:
        applied = migrate(url)
    except (psycopg.OperationalError, MigrationError) as exc:  # one line, no password in it
        raise database_failure(exc, url) from None
    with database.connect() as conn:
        versions = applied_versions(conn)
    return dg.MaterializeResult(
        metadata={
            "schema_version": dg.MetadataValue.int(max(versions, default=0)),
            "applied_this_run": dg.MetadataValue.int(len(applied)),
            "migrations": dg.MetadataValue.md(
                markdown_table(["version", "migration"], [(v, n) for v, (n, _) in versions.items()])
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
        made = ensure_month(conn, month, config.months_ahead)
    partitions = [(name, "not analysed" if rows is None else rows, size) for name, rows, size in made.partitions]
    return dg.MaterializeResult(
        metadata={
            "partition": dg.MetadataValue.text(made.partition),
            "rows": dg.MetadataValue.int(made.rows),
            "created": dg.MetadataValue.json(made.created),
            "partitions": dg.MetadataValue.md(markdown_table(["partition", "estimated rows", "size"], partitions)),
        }
    )
