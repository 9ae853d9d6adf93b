"""The schema's jobs, and the daily schedule that keeps this month's partition and the months ahead in place."""

from datetime import UTC, datetime

import dagster as dg

from dlq_assets.defs.common import asset_job
from dlq_assets.defs.schema.assets import dlq_partitions, dlq_schema

schema_job = asset_job("dlq_schema_job", dg.AssetSelection.assets(dlq_schema), "Apply pending migrations.")
partitions_job = asset_job(
    "dlq_partitions_job",
    dg.AssetSelection.assets(dlq_partitions),
    "Create this month's partition and the months ahead.",
)


@dg.schedule(
    name="dlq_partitions_daily",
    job=partitions_job,
    cron_schedule="15 0 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,  # on: without next month's partition, rows pile into the default
)
def partitions_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Every day, make sure this month's partition and the months ahead exist (idempotent)."""
    moment = context.scheduled_execution_time or datetime.now(UTC)
    month = moment.astimezone(UTC).strftime("%Y-%m-01")
    return dg.RunRequest(run_key=f"partitions-{moment:%Y-%m-%d}", partition_key=month)
