"""Alerting. Open-source Dagster has no alert policies, and a failed WARN check fails no run (so no run-failure
sensor ever sees it): one sensor reads the health checks' executions from the instance and reports each new
failure once, another reports failed runs. Both log, and post JSON to ``DLQ_ALERT_WEBHOOK_URL`` when it is set."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import Any

import dagster as dg

from dlq_assets.defs.alerts.checks import health_checks

WEBHOOK_ENV = "DLQ_ALERT_WEBHOOK_URL"
HISTORY_LIMIT = 100  # executions read per check and tick; more between two ticks would be a flood anyway
CHECK_KEYS = [dg.AssetCheckKey(spec.asset_key, spec.name) for checks in health_checks for spec in checks.check_specs]


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


def _check_message(
    evaluation: dg.AssetCheckEvaluation, *, run_id: str, execution_id: int, timestamp: float
) -> dict[str, Any]:
    severity = evaluation.severity.value
    metadata = {k: v.value for k, v in evaluation.metadata.items() if k in ("value", "threshold")}
    check = evaluation.asset_check_key.to_user_string()
    return {
        "text": f"[{severity}] DLQ check {check} failed: {evaluation.description or 'no description'} (run {run_id})",
        "kind": "asset_check_failed",
        "check": check,
        "severity": severity,
        "description": evaluation.description,
        "metadata": metadata,
        "run_id": run_id,
        "execution_id": execution_id,
        "timestamp": timestamp,
    }


def _executions(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey, *, limit: int, after: int, planned: set[int]
) -> list[Any]:
    """Of the check's latest ``limit`` executions, those newer than ``after`` or in ``planned``, oldest first."""
    records = instance.event_log_storage.get_asset_check_execution_history(key, limit=limit)
    return sorted((r for r in records if r.id > after or r.id in planned), key=lambda r: r.id)


def _result(record: Any) -> dg.AssetCheckEvaluation | None:
    """An execution's result; None while it is only planned (its event then holds the plan, not a result)."""
    evaluation = record.evaluation
    return evaluation if isinstance(evaluation, dg.AssetCheckEvaluation) else None


def _run_ended(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is None or run.is_finished


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,  # on: alerts go to the daemon log, a webhook only when set
    description="Reports each new failed DLQ health-check evaluation once: to the log and the alert webhook.",
)
def check_failure_alert_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Cursor per check: the newest execution id seen, plus the ids still planned then (a planned execution gets
    its result in place, under the same id). A fresh cursor reports only each check's latest execution: the current
    state, not the whole history.

    Executions come from the instance's event-log storage; each carries its result as a ``dg.AssetCheckEvaluation``
    (none while it is only planned). A planned execution whose run has ended without a result (the run failed or
    was cancelled first; the run-failure sensor reports that) is forgotten."""
    cursor: dict[str, dict[str, Any]] = json.loads(context.cursor) if context.cursor else {}
    instance = context.instance
    reported = 0
    for key in CHECK_KEYS:
        seen = cursor.get(key.to_user_string())
        last, planned = (seen["last"], set(seen["planned"])) if seen else (0, set())
        limit = HISTORY_LIMIT if seen else 1
        records = _executions(instance, key, limit=limit, after=last, planned=planned)
        ended = {r.run_id for r in records if _result(r) is None and _run_ended(instance, r.run_id)}
        if ended:  # read again: a result is stored before its run ends, so this read holds every one of theirs
            records = _executions(instance, key, limit=limit, after=last, planned=planned)
        still_planned = []
        for record in records:
            evaluation = _result(record)
            if evaluation is None:
                if record.run_id not in ended:
                    still_planned.append(record.id)
            elif not evaluation.passed:
                message = _check_message(
                    evaluation, run_id=record.run_id, execution_id=record.id, timestamp=record.create_timestamp
                )
                _alert(context.log, message, error=evaluation.severity == dg.AssetCheckSeverity.ERROR)
                reported += 1
        newest = max((r.id for r in records), default=last)
        cursor[key.to_user_string()] = {"last": max(last, newest), "planned": still_planned}
    context.update_cursor(json.dumps(cursor, sort_keys=True))
    return dg.SkipReason(f"reported {reported} failed check evaluation(s)")


def _root_cause(event: dg.DagsterEvent) -> str:
    """The user's exception behind a step failure, not Dagster's wrapper around it."""
    error = event.event_specific_data.error  # the step-failure data, as the get_step_failure_events docs read it
    while error is not None and error.cause is not None:
        error = error.cause
    return error.message.strip()[:500] if error is not None else "no error recorded"


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,  # on: alerts go to the daemon log, a webhook only when set
    description="Reports each failed run of this code location: to the log and the alert webhook.",
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext) -> None:
    run = context.dagster_run
    steps = [f"{event.step_key}: {_root_cause(event)}" for event in context.get_step_failure_events()]
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
