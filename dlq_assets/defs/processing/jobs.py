"""The processing job and its schedule: the backlog is worked every five minutes."""

import dagster as dg

from dlq_assets.defs.common import asset_job
from dlq_assets.defs.processing.assets import dlq_processed_batches

processing_job = asset_job(
    "dlq_processing_job",
    dg.AssetSelection.assets(dlq_processed_batches),
    "Work the backlog within a time budget; its health checks run with it.",
)

processing_schedule = dg.ScheduleDefinition(
    name="dlq_processing_every_5_minutes",
    job=processing_job,
    cron_schedule="*/5 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,  # on: working the backlog is what the DLQ is for
)
