"""Failure patterns, read from the DLQ by ``dlq_assets.core.operations.analysis``.

No ``from __future__ import annotations``: Dagster reads the ``config`` and resource annotations at decoration time."""

import base64
from datetime import UTC, datetime, timedelta

import dagster as dg
from pydantic import Field

from dlq_assets.defs.common import GROUP, POOL
from dlq_assets.defs.processing.assets import dlq_processed_batches
from dlq_assets.defs.resources import DLQDatabase


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
    # Imported per run: pandas and matplotlib stay out of loading the definitions.
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
