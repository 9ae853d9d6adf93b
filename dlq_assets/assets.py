"""Software-defined assets over the DLQ."""

from __future__ import annotations

import dagster as dg

from dlq_assets.migrations import applied_versions, migrate
from dlq_assets.resources import DLQDatabase


@dg.asset(kinds={"postgres", "sql"}, group_name="dlq", description="The DLQ schema: every migration in sql/ applied.")
def dlq_schema(database: DLQDatabase) -> dg.MaterializeResult:
    url = database.resolved_url()
    applied = migrate(url)
    with database.connect() as conn:
        versions = applied_versions(conn)
    table = "| version | migration |\n|---|---|\n" + "\n".join(f"| {v} | {n} |" for v, (n, _) in versions.items())
    return dg.MaterializeResult(
        metadata={
            "schema_version": dg.MetadataValue.int(max(versions, default=0)),
            "applied_this_run": dg.MetadataValue.int(len(applied)),
            "migrations": dg.MetadataValue.md(table),
        }
    )
