"""Through the daemon of `dlq dev`: the processing schedule fires on its own and launches one run per slot
(DLQ_PROCESSING_RUNS); the runs work one backlog at once, succeed and record their checks; no event is processed
twice and every event ends in one known state. Runs launched by hand at once overlap, and a slot holds one run.

The 5-minute schedule is reached in about a minute: the Dagster processes (`dlq dev`, its webserver, daemon and
run workers) see Dagster's clock shifted to a minute before a tick (tests/defs/shifted_clock). Python's own clock
and PostgreSQL's, which the DLQ's leases, budgets and backoff use, stay real."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.defs.processing.jobs import RUNS_ENV, SLOT_TAG, processing_job, processing_schedule, slot_tags
from dlq_assets.defs.processing.sensors import BACKLOG_THRESHOLD_ENV
from dlq_assets.devtools.generator import write_corrupted_log
from tests.defs.dagster_dev import REPOSITORY, DagsterDev, dagster_dev
from tests.reliability.conftest import assert_ledger_holds, assert_processed_once_per_lease, take_ledger

RUNS = 3
TICK = 300  # the processing schedule's period, seconds
RUNS_BY_TAG = """
query($key: String!, $value: String!) {
  runsOrError(filter: {tags: [{key: $key, value: $value}]}) {
    ... on Runs { results { runId status startTime endTime tags { key value } } }
  }
}
"""
LOGS = """
query($id: ID!) {
  logsForRun(runId: $id, limit: 5000) {
    ... on EventConnection { events { __typename
      ... on MaterializationEvent { assetKey { path } metadataEntries { label ... on IntMetadataEntry { intValue } } }
      ... on AssetCheckEvaluationEvent { evaluation { checkName success severity } } } }
  }
}
"""
LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  }
}
"""
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
SHIFTED_CLOCK = Path(__file__).resolve().parent / "shifted_clock"


def shifted_clock(lead_seconds: int = 60) -> dict[str, str]:
    """An environment whose Dagster processes see the clock ``lead_seconds`` before a processing tick that is not
    also a 15-minute tick (the health-check schedule's), so the first tick the daemon reaches is the processing one."""
    now = time.time()
    tick = math.ceil((now + 2 * lead_seconds) / TICK) * TICK
    while tick % 900 == 0:
        tick += TICK
    path = os.pathsep.join(filter(None, [str(SHIFTED_CLOCK), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "DLQ_TEST_DAGSTER_CLOCK_OFFSET": str(round(tick - lead_seconds - now))}


def runs_tagged(dev: DagsterDev, key: str, value: str) -> list[dict[str, Any]]:
    runs = dev.graphql(RUNS_BY_TAG, {"key": key, "value": value})["runsOrError"]["results"]
    return [{**run, "tags": {t["key"]: t["value"] for t in run["tags"]}} for run in runs]


def wait_for_runs(dev: DagsterDev, key: str, value: str, count: int, timeout: float) -> list[dict[str, Any]]:
    """``count`` runs with that tag, all finished."""
    deadline = time.monotonic() + timeout
    while True:
        runs = runs_tagged(dev, key, value)
        if len(runs) >= count and all(run["status"] in FINISHED for run in runs):
            return runs
        assert time.monotonic() < deadline, (
            f"waiting for {count} runs {key}={value}",
            runs,
            dev.log.read_text()[-3000:],
        )
        time.sleep(2)


def run_events(dev: DagsterDev, run_id: str) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """The processed-batches metadata (integers) and the check evaluations of one run."""
    events = dev.graphql(LOGS, {"id": run_id})["logsForRun"]["events"]
    (materialization,) = [e for e in events if e["__typename"] == "MaterializationEvent"]
    assert materialization["assetKey"]["path"] == ["dlq_processed_batches"]
    metadata = {m["label"]: m["intValue"] for m in materialization["metadataEntries"] if "intValue" in m}
    checks = {
        e["evaluation"]["checkName"]: e["evaluation"] for e in events if e["__typename"] == "AssetCheckEvaluationEvent"
    }
    return metadata, checks


def claiming_workers(url: str) -> set[str]:
    """The worker processes (host:pid) that claimed events: one per processing run (one worker each)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT a ->> 'worker' FROM (SELECT processing_attempts FROM dead_letter_events UNION ALL "
            "SELECT processing_attempts FROM dlq_poison_events) e, jsonb_array_elements(e.processing_attempts) a "
            "WHERE a ? 'worker'"
        ).fetchall()
    return {worker for (worker,) in rows}


def backlog(url: str, path: Path, events: int, seed: int) -> None:
    write_corrupted_log(path, n_events=events, seed=seed, corruption_rate=0.5)
    ingest_paths([path], url=url)


@pytest.mark.timeout(900)
def test_the_schedule_fires_through_the_daemon_as_concurrent_processing_runs(
    db_url: str, server_url: str, tmp_path: Path
) -> None:
    env = {
        **shifted_clock(),
        RUNS_ENV: str(RUNS),
        BACKLOG_THRESHOLD_ENV: str(10**9),  # the backlog sensor stays out of it: the schedule launches the runs
    }
    backlog(db_url, tmp_path / "first.json", 5_000, seed=31)
    before = take_ledger(db_url)
    with dagster_dev(db_url, server_url, tmp_path, env) as dev:
        # 1. The schedule fires (about a minute in, by the shifted clock): one run per slot, launched by the daemon.
        scheduled = wait_for_runs(dev, "dagster/schedule_name", processing_schedule.name, RUNS, timeout=480)
        assert len(scheduled) == RUNS, scheduled
        assert {run["status"] for run in scheduled} == {"SUCCESS"}, scheduled
        assert sorted(run["tags"][SLOT_TAG] for run in scheduled) == [f"{k}/{RUNS}" for k in range(1, RUNS + 1)]
        for run in scheduled:
            _, checks = run_events(dev, run["runId"])
            assert len(checks) == 7, checks  # every health check evaluated and recorded with the run
            for name in ("stale_locks", "breaker_open", "tampered_events"):
                assert checks[name]["success"], (name, checks[name])
        after = take_ledger(db_url)
        states = assert_ledger_holds(before, after)  # nothing lost or applied twice, every event settled
        assert states["resolved"] > 0
        with psycopg.connect(db_url) as conn:
            assert_processed_once_per_lease(conn)
        workers = claiming_workers(db_url)
        assert 1 <= len(workers) <= RUNS  # the first run may have emptied the backlog before the others started

        # 2. Runs launched by hand at once, throttled so they overlap: three slots work together, and a fourth run
        # for slot 1 waits for the first to end (dagster.yaml: one run per slot).
        backlog(db_url, tmp_path / "second.json", 3_000, seed=32)
        before = take_ledger(db_url)
        launched = [launch(dev, slot) for slot in (1, 2, 3, 1)]
        runs = {run["runId"]: run for run in wait_for_runs(dev, "dlq/trigger", "test", 4, timeout=300)}
        first, second, third, again = (runs[run_id] for run_id in launched)
        assert {run["status"] for run in runs.values()} == {"SUCCESS"}, runs
        together = (first, second, third)
        assert max(r["startTime"] for r in together) < min(r["endTime"] for r in together), together  # overlapped
        assert again["startTime"] >= first["endTime"], (first, again)  # the slot held its second run back
        worked = [run_events(dev, run["runId"])[0]["processed"] for run in together]
        assert all(n > 0 for n in worked), (worked, together)
        assert_ledger_holds(before, take_ledger(db_url))
        with psycopg.connect(db_url) as conn:
            assert_processed_once_per_lease(conn)
        assert len(claiming_workers(db_url) - workers) >= RUNS  # each run claimed in its own worker process


def launch(dev: DagsterDev, slot: int) -> str:
    params = {
        "selector": {**REPOSITORY, "jobName": processing_job.name},
        "runConfigData": {
            "ops": {"dlq_processed_batches": {"config": {"max_events_per_second": 30, "batch_size": 10}}}
        },
        "executionMetadata": {
            "tags": [{"key": k, "value": v} for k, v in {**slot_tags(slot, RUNS), "dlq/trigger": "test"}.items()]
        },
    }
    launched = dev.graphql(LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]
