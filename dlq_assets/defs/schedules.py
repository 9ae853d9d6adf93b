"""Asset jobs and their schedules: processing every few minutes, analysis hourly, maintenance daily, checks."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from dlq_assets.defs.assets import (
    dlq_failure_patterns,
    dlq_partitions,
    dlq_processed_batches,
    dlq_retention_state,
    dlq_schema,
)

JOB_TAG = "dlq/job"  # dagster.yaml allows one run at a time per value of this tag


def _job(
    name: str, selection: dg.AssetSelection, description: str, **kwargs: object
) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(name, selection=selection, description=description, tags={JOB_TAG: name}, **kwargs)


processing_job = _job(
    "dlq_processing_job",
    dg.AssetSelection.assets(dlq_processed_batches),
    "Work the backlog within a time budget; its health checks run with it.",
)
analysis_job = _job("dlq_analysis_job", dg.AssetSelection.assets(dlq_failure_patterns), "Failure patterns of the DLQ.")
retention_job = _job(
    "dlq_retention_job", dg.AssetSelection.assets(dlq_retention_state), "Retention: delete and drop what expired."
)
partitions_job = _job(
    "dlq_partitions_job",
    dg.AssetSelection.assets(dlq_partitions),
    "Create this month's partition and the months ahead.",
)
schema_job = _job("dlq_schema_job", dg.AssetSelection.assets(dlq_schema), "Apply pending migrations.")
checks_job = _job(
    "dlq_health_checks_job",
    dg.AssetSelection.checks_for_assets(dlq_processed_batches),
    "Evaluate the health checks without processing anything.",
)

processing_schedule = dg.ScheduleDefinition(
    name="dlq_processing_every_5_minutes",
    job=processing_job,
    cron_schedule="*/5 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
analysis_schedule = dg.ScheduleDefinition(
    name="dlq_analysis_hourly",
    job=analysis_job,
    cron_schedule="7 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
retention_schedule = dg.ScheduleDefinition(
    name="dlq_retention_daily",
    job=retention_job,
    cron_schedule="30 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
checks_schedule = dg.ScheduleDefinition(
    name="dlq_health_checks_every_15_minutes",
    job=checks_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


@dg.schedule(
    name="dlq_partitions_daily",
    job=partitions_job,
    cron_schedule="15 0 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def partitions_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Every day, make sure this month's partition and the months ahead exist (idempotent)."""
    moment = context.scheduled_execution_time or datetime.now(UTC)
    month = moment.astimezone(UTC).strftime("%Y-%m-01")
    return dg.RunRequest(run_key=f"partitions-{moment:%Y-%m-%d}", partition_key=month)


jobs = [processing_job, analysis_job, retention_job, partitions_job, schema_job, checks_job]
schedules = [processing_schedule, analysis_schedule, retention_schedule, checks_schedule, partitions_schedule]
