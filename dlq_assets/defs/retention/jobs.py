"""The retention job and its daily schedule (03:30 UTC)."""

import dagster as dg

from dlq_assets.defs.common import asset_job
from dlq_assets.defs.retention.assets import dlq_retention_state

retention_job = asset_job(
    "dlq_retention_job", dg.AssetSelection.assets(dlq_retention_state), "Retention: delete and drop what expired."
)

retention_schedule = dg.ScheduleDefinition(
    name="dlq_retention_daily",
    job=retention_job,
    cron_schedule="30 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,  # on: it deletes only what was resolved 90+ days ago
)
