"""Alerting. Open-source Dagster has no alert policies, and a failed WARN check fails no run (so no run-failure
sensor ever sees it): one sensor reads the health checks' executions from the instance and reports each new
failure once, another reports failed runs. Both log, and post JSON to ``DLQ_ALERT_WEBHOOK_URL`` when it is set."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import TYPE_CHECKING, Any

import dagster as dg

from dlq_assets.defs.checks import health_checks
from dlq_assets.defs.resources import DLQDatabase

if TYPE_CHECKING:
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecord
    from dagster_shared.error import SerializableErrorInfo

WEBHOOK_ENV = "DLQ_ALERT_WEBHOOK_URL"
HISTORY_LIMIT = 100  # executions read per check and tick; more between two ticks would be a flood anyway
CHECK_KEYS = [key for checks_def in health_checks for key in checks_def.check_keys]


def notify(message: dict[str, Any], *, url: str | None) -> None:
    """POST ``message`` as JSON to ``url`` (no-op without one). Raises ``OSError`` when delivery fails.

    A Slack incoming webhook accepts the same payload: it shows the ``text`` field."""
    if not url:
        return
    body = json.dumps(message, default=str).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10):  # non-2xx raises HTTPError
        pass


def _alert(log: logging.Logger, message: dict[str, Any], *, error: bool) -> None:
    """Log the alert, then send it; a failing webhook is logged, never raised: the alert is not re-sent."""
    (log.error if error else log.warning)(message["text"])
    url = os.environ.get(WEBHOOK_ENV)  # read per alert, never at import
    try:
        notify(message, url=url)
    except Exception as exc:  # any failure to deliver must not stop the other alerts or the cursor
        log.error(f"alert webhook failed ({type(exc).__name__}: {exc}); the alert above was not delivered")


def _check_message(record: AssetCheckExecutionRecord) -> dict[str, Any]:
    evaluation = record.evaluation
    severity = evaluation.severity.value
    metadata = {k: v.value for k, v in evaluation.metadata.items() if k in ("value", "threshold")}
    check = record.key.to_user_string()
    return {
        "text": f"[{severity}] DLQ check {check} failed: {evaluation.description or 'no description'} "
        f"(run {record.run_id})",
        "kind": "asset_check_failed",
        "check": check,
        "severity": severity,
        "description": evaluation.description,
        "metadata": metadata,
        "run_id": record.run_id,
        "execution_id": record.id,
        "timestamp": record.create_timestamp,
    }


def _root_cause(error: SerializableErrorInfo | None) -> str:
    """The user's exception, not Dagster's wrapper around it."""
    while error is not None and error.cause is not None:
        error = error.cause
    return error.message.strip()[:500] if error is not None else "no error recorded"


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reports each new failed DLQ health-check evaluation once: to the log and the alert webhook.",
)
def check_failure_alert_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Cursor per check: the newest execution id seen, plus ids still planned then (they complete in place).

    A fresh cursor reports only each check's latest execution: the current state, not the whole history."""
    cursor: dict[str, dict[str, Any]] = json.loads(context.cursor) if context.cursor else {}
    storage = context.instance.event_log_storage
    reported = 0
    for key in CHECK_KEYS:
        seen = cursor.get(key.to_user_string())
        last, planned = (seen["last"], set(seen["planned"])) if seen else (0, set())
        records = storage.get_asset_check_execution_history(key, limit=HISTORY_LIMIT if seen else 1)
        still_planned = []
        for record in sorted(records, key=lambda r: r.id):
            if record.id <= last and record.id not in planned:
                continue
            if record.status.value == "PLANNED":
                still_planned.append(record.id)
            elif record.status.value == "FAILED":
                message = _check_message(record)
                _alert(context.log, message, error=message["severity"] == "ERROR")
                reported += 1
        newest = max((r.id for r in records), default=last)
        cursor[key.to_user_string()] = {"last": max(last, newest), "planned": still_planned}
    context.update_cursor(json.dumps(cursor, sort_keys=True))
    return dg.SkipReason(f"reported {reported} failed check evaluation(s)")


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reports each failed run of this code location: to the log and the alert webhook.",
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext) -> None:
    run = context.dagster_run
    steps = [
        f"{event.step_key}: {_root_cause(event.step_failure_data.error)}" for event in context.get_step_failure_events()
    ]
    reason = context.failure_event.message or "no message"
    message = {
        "text": f"[ERROR] Dagster run {run.run_id} of {run.job_name} failed: {reason}"
        + "".join(f"\n- {step}" for step in steps),
        "kind": "run_failed",
        "severity": "ERROR",
        "run_id": run.run_id,
        "job_name": run.job_name,
        "reason": reason,
        "failed_steps": steps,
    }
    _alert(context.log, message, error=True)


BACKLOG_THRESHOLD_ENV = "DLQ_BACKLOG_THRESHOLD"
DEFAULT_BACKLOG_THRESHOLD = 10_000
_ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


@dg.sensor(
    job_name="dlq_processing_job",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches processing early when the pending backlog passes DLQ_BACKLOG_THRESHOLD (default 10,000).",
)
def backlog_sensor(context: dg.SensorEvaluationContext, database: DLQDatabase) -> dg.RunRequest | dg.SkipReason:
    threshold = int(os.environ.get(BACKLOG_THRESHOLD_ENV) or DEFAULT_BACKLOG_THRESHOLD)  # read per tick
    with database.connect() as conn:
        (pending,) = conn.execute("SELECT pending_events FROM dlq_health").fetchone()
    if pending <= threshold:
        return dg.SkipReason(f"{pending} pending dead letters, threshold {threshold}")
    active = context.instance.get_run_records(dg.RunsFilter(job_name="dlq_processing_job", statuses=_ACTIVE), limit=1)
    if active:
        return dg.SkipReason(f"{pending} pending, but processing run {active[0].dagster_run.run_id} is already active")
    context.log.info(f"{pending} pending dead letters passed the threshold {threshold}: launching processing")
    return dg.RunRequest(tags={"dlq/trigger": "backlog", "dlq/pending": str(pending)})
