"""The analysis job and its hourly schedule."""

import dagster as dg

from dlq_assets.defs.analysis.assets import dlq_failure_patterns
from dlq_assets.defs.common import asset_job

analysis_job = asset_job(
    "dlq_analysis_job", dg.AssetSelection.assets(dlq_failure_patterns), "Failure patterns of the DLQ."
)

analysis_schedule = dg.ScheduleDefinition(
    name="dlq_analysis_hourly",
    job=analysis_job,
    cron_schedule="7 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,  # on: read-only, and the failure patterns stay current
)
