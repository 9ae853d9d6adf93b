"""The backlog sensor: fills the free processing slots between scheduled runs when the backlog grows too large.

No ``from __future__ import annotations``: Dagster reads the resource annotation at decoration time."""

import os
import re

import dagster as dg

from dlq_assets.core.operations.inspect import due_events, health_view
from dlq_assets.defs.common import JOB_TAG
from dlq_assets.defs.processing.jobs import processing_job, processing_runs, slot_tags
from dlq_assets.defs.resources import DLQDatabase

BACKLOG_THRESHOLD_ENV = "DLQ_BACKLOG_THRESHOLD"
DEFAULT_BACKLOG_THRESHOLD = 10_000
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def backlog_threshold() -> int:
    """``DLQ_BACKLOG_THRESHOLD``: a whole number of dead letters, 0 or more."""
    raw = os.environ.get(BACKLOG_THRESHOLD_ENV, "").strip() or str(DEFAULT_BACKLOG_THRESHOLD)
    if not re.fullmatch(r"[0-9]{1,12}", raw):
        raise ValueError(f"{BACKLOG_THRESHOLD_ENV} must be a whole number of dead letters, not {raw!r}")
    return int(raw)


@dg.sensor(
    job=processing_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,  # on: a burst of dead letters should not wait 5 minutes
    description=(
        "Launches processing early, one run per free slot (DLQ_PROCESSING_RUNS), when more dead letters than "
        "DLQ_BACKLOG_THRESHOLD (default 10,000) are due (events waiting out a retry backoff are not)."
    ),
)
def backlog_sensor(context: dg.SensorEvaluationContext, database: DLQDatabase) -> list[dg.RunRequest] | dg.SkipReason:
    threshold, runs = backlog_threshold(), processing_runs()
    with database.connect() as conn:
        pending = health_view(conn)["pending_events"]
        due = due_events(conn, threshold + 1)  # events waiting out a backoff give a run nothing to do
    if due <= threshold:
        return dg.SkipReason(f"{due} dead letters due now ({pending} pending), threshold {threshold}")
    active = context.instance.get_run_records(dg.RunsFilter(job_name=processing_job.name, statuses=ACTIVE_STATUSES))
    if len(active) >= runs:
        return dg.SkipReason(f"{due} due, but {len(active)} processing runs are already active")
    taken = {record.dagster_run.tags.get(JOB_TAG) for record in active}
    free = [slot for slot in range(1, runs + 1) if slot_tags(slot, runs)[JOB_TAG] not in taken]
    launch = free[: runs - len(active)]  # a run launched by hand, without a slot, counts against the total too
    context.log.info(f"more than {threshold} dead letters due ({pending} pending): {len(launch)} processing runs")
    trigger = {"dlq/trigger": "backlog", "dlq/pending": str(pending)}
    return [dg.RunRequest(tags={**slot_tags(slot, runs), **trigger}) for slot in launch]
