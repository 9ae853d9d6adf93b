"""The health-checks job and its schedule: the checks also run with every processing run; this evaluates them
every 15 minutes without processing anything, so a stalled schedule or an open breaker still shows."""

import dagster as dg

from dlq_assets.defs.common import asset_job
from dlq_assets.defs.processing.assets import dlq_processed_batches

checks_job = asset_job(
    "dlq_health_checks_job",
    dg.AssetSelection.checks_for_assets(dlq_processed_batches),
    "Evaluate the health checks without processing anything.",
)

checks_schedule = dg.ScheduleDefinition(
    name="dlq_health_checks_every_15_minutes",
    job=checks_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,  # on: a stalled DLQ must show even when nothing processes
)
