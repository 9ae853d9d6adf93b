"""The backlog sensor: launches the processing job between its scheduled runs when the backlog grows too large.

No ``from __future__ import annotations``: Dagster reads the resource annotation at decoration time."""

import os

import dagster as dg

from dlq_assets.core.operations.inspect import health_view
from dlq_assets.defs.processing.jobs import processing_job
from dlq_assets.defs.resources import DLQDatabase

BACKLOG_THRESHOLD_ENV = "DLQ_BACKLOG_THRESHOLD"
DEFAULT_BACKLOG_THRESHOLD = 10_000
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


@dg.sensor(
    job=processing_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,  # on: a burst of dead letters should not wait 5 minutes
    description="Launches processing early when the pending backlog passes DLQ_BACKLOG_THRESHOLD (default 10,000).",
)
def backlog_sensor(context: dg.SensorEvaluationContext, database: DLQDatabase) -> dg.RunRequest | dg.SkipReason:
    threshold = int(os.environ.get(BACKLOG_THRESHOLD_ENV) or DEFAULT_BACKLOG_THRESHOLD)  # read per tick
    with database.connect() as conn:
        pending = health_view(conn)["pending_events"]
    if pending <= threshold:
        return dg.SkipReason(f"{pending} pending dead letters, threshold {threshold}")
    active = context.instance.get_run_records(
        dg.RunsFilter(job_name=processing_job.name, statuses=ACTIVE_STATUSES), limit=1
    )
    if active:
        return dg.SkipReason(f"{pending} pending, but processing run {active[0].dagster_run.run_id} is already active")
    context.log.info(f"{pending} pending dead letters passed the threshold {threshold}: launching processing")
    return dg.RunRequest(tags={"dlq/trigger": "backlog", "dlq/pending": str(pending)})
