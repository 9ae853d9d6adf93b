"""The processing job and its schedule: the backlog is worked every five minutes by ``DLQ_PROCESSING_RUNS``
concurrent runs.

Concurrent runs are safe by construction: each claims its batches with ``FOR UPDATE SKIP LOCKED`` under a fenced
lease, so no event is worked by two runs. Each run carries a slot tag (``dlq/job`` = ``dlq_processing_job:K``);
dagster.yaml allows one run per value of that tag, so a slow run holds back only its own slot's next run, and at
most ``DLQ_PROCESSING_RUNS`` scheduled runs work at once. The runs can be launched anywhere Dagster's run launcher
puts them (other machines, containers, pods): they share nothing but the database."""

import os
import re

import dagster as dg

from dlq_assets.defs.common import JOB_TAG, asset_job
from dlq_assets.defs.processing.assets import dlq_processed_batches

RUNS_ENV = "DLQ_PROCESSING_RUNS"
DEFAULT_RUNS = 2
MAX_RUNS = 16
SLOT_TAG = "dlq/slot"  # "K/N": the run's slot among N, shown in the UI

# A processing run still going after this long is stuck (its budget is at most 3,000 s): run monitoring fails it,
# which frees its slot, and a run whose `dlq dev` or daemon died with it does not hold the slot forever.
MAX_RUNTIME_SECONDS = 3600

processing_job = asset_job(
    "dlq_processing_job",
    dg.AssetSelection.assets(dlq_processed_batches),
    "Work the backlog within a time budget; its health checks run with it.",
    tags={"dagster/max_runtime": str(MAX_RUNTIME_SECONDS)},
)


def processing_runs() -> int:
    """How many processing runs work the backlog at once: ``DLQ_PROCESSING_RUNS`` (``dlq dev`` refuses to start on
    a bad value; a code location started otherwise fails each tick, naming it)."""
    raw = os.environ.get(RUNS_ENV, "").strip() or str(DEFAULT_RUNS)
    runs = int(raw) if re.fullmatch(r"[0-9]{1,2}", raw) else 0
    if not 1 <= runs <= MAX_RUNS:
        raise ValueError(f"{RUNS_ENV} must be a whole number from 1 to {MAX_RUNS}, not {raw!r}")
    return runs


def slot_tags(slot: int, runs: int) -> dict[str, str]:
    """The tags of slot ``slot`` of ``runs`` (1-based): one run at a time per slot."""
    return {JOB_TAG: f"{processing_job.name}:{slot}", SLOT_TAG: f"{slot}/{runs}"}


@dg.schedule(
    name="dlq_processing_every_5_minutes",
    job=processing_job,
    cron_schedule="*/5 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,  # on: working the backlog is what the DLQ is for
    description=f"Every 5 minutes, {RUNS_ENV} (default {DEFAULT_RUNS}) concurrent processing runs, one per slot.",
)
def processing_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    runs = processing_runs()
    return [dg.RunRequest(run_key=f"slot-{slot}", tags=slot_tags(slot, runs)) for slot in range(1, runs + 1)]
