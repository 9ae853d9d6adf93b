"""Every asset materialized through Dagster, on the instance ``dlq dev`` serves, so the UI's first screen shows a
living DLQ: the schema, this month's partition, a processed batch with its checks, the failure patterns and the
retention state, each with its metadata.

The jobs are the ones the schedules launch (``dlq_assets.definitions``), run in this process against the same
``DAGSTER_HOME`` and the same ``dagster`` database that ``dlq dev`` prepares. The backlog is worked in
``PROCESSING_ROUNDS`` runs of a share each, so the backlog's chart opens on a line going down, not a single point.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dlq_assets.devtools.dev import prepare

PROCESSING_ROUNDS = 3
# The runs' event log is in the instance (the UI shows it); the console gets warnings and errors only.
_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class FirstRun:
    dagster_home: str
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset -> its metadata, as plain values
    checks: dict[str, bool] = field(default_factory=dict)  # check name -> passed
    runs: dict[str, str] = field(default_factory=dict)  # job -> run id (processing: its last round)
    processing_rounds: list[dict[str, Any]] = field(default_factory=list)  # each processing run's metadata


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in os.environ for the duration (Dagster's instance and the resources read them there)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _plain(value: Any) -> Any:
    """A metadata value as JSON-ready Python (the UI's types hold it in ``.value``, markdown as its text)."""
    inner = getattr(value, "value", value)
    return inner if isinstance(inner, str | int | float | bool | list | dict | type(None)) else str(inner)


def _pending(url: str) -> int:
    from dlq_assets.core import db
    from dlq_assets.core.operations.inspect import health_view

    with db.connect(url) as conn:
        return int(health_view(conn)["pending_events"])


def first_run_jobs() -> tuple[Any, ...]:
    """The asset jobs in the order a first run needs them: the schema before its partitions, processing before
    the analysis of it."""
    from dlq_assets.defs.analysis.jobs import analysis_job
    from dlq_assets.defs.processing.jobs import processing_job
    from dlq_assets.defs.retention.jobs import retention_job
    from dlq_assets.defs.schema.jobs import partitions_job, schema_job

    return schema_job, partitions_job, processing_job, analysis_job, retention_job


def materialize_everything(url: str, *, dagster_home: Path | None = None) -> FirstRun:
    """Run the five asset jobs once, in order, on the ``dlq dev`` instance; a job that fails raises."""
    import dagster as dg

    env = prepare(url, dagster_home=dagster_home)
    report = FirstRun(dagster_home=env["DAGSTER_HOME"])
    with _environment(env):
        from dlq_assets.definitions import defs
        from dlq_assets.defs.processing.jobs import processing_job
        from dlq_assets.defs.schema.jobs import partitions_job

        instance = dg.DagsterInstance.get()
        month = datetime.now(UTC).strftime("%Y-%m-01")
        for job in first_run_jobs():
            rounds = PROCESSING_ROUNDS if job is processing_job else 1
            for round_number in range(1, rounds + 1):
                config = _QUIET
                if job is processing_job and round_number < rounds:  # a share of what is pending; the last: the rest
                    done = report.processing_rounds  # each round's metadata holds the backlog it left
                    pending = done[-1]["backlog_pending"] if done else _pending(url)
                    share = max(1, math.ceil(pending / (rounds - round_number + 1)))
                    config = {**_QUIET, "ops": {"dlq_processed_batches": {"config": {"max_events": share}}}}
                result = defs.resolve_job_def(job.name).execute_in_process(  # bound to the location's resources
                    run_config=config,
                    instance=instance,
                    partition_key=month if job is partitions_job else None,
                    tags={"dlq/trigger": "first_run"},
                )
                report.runs[job.name] = result.run_id
                for event in result.get_asset_materialization_events():
                    materialization = event.step_materialization_data.materialization
                    report.metadata[materialization.asset_key.to_user_string()] = {
                        key: _plain(value) for key, value in materialization.metadata.items()
                    }
                for evaluation in result.get_asset_check_evaluations():
                    report.checks[evaluation.check_name] = evaluation.passed
                if job is processing_job:
                    report.processing_rounds.append(report.metadata["dlq_processed_batches"])
    return report
