"""End to end: `dlq dev` brings up the webserver and daemon on PostgreSQL storage; a run launched through
the GraphQL API materializes on the real DLQ and its checks report back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.devtools.generator import write_corrupted_log
from tests.defs.dagster_dev import LOCATION, graphql, settled_asset_node
from tests.defs.dagster_dev import dagster_dev as serve


@pytest.fixture
def dagster_dev(db_url: str, server_url: str, tmp_path: Path) -> Iterator[int]:
    with serve(db_url, server_url, tmp_path) as dev:
        yield dev.port


LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
CHECKS = """
{ assetNodes(assetKeys: [{path: ["dlq_processed_batches"]}]) {
    assetMaterializations(limit: 1) { metadataEntries { label ... on IntMetadataEntry { intValue } } }
    assetChecksOrError { ... on AssetChecks { checks { name blocking
      executionForLatestMaterialization { status evaluation { success severity } } } } } } }
"""


SCHEDULES = """
query($selector: RepositorySelector!) {
  schedulesOrError(repositorySelector: $selector) { ... on Schedules { results { id name } } }
}
"""
STOP_SCHEDULE = """
mutation($id: String) {
  stopRunningSchedule(id: $id) {
    __typename
    ... on ScheduleStateResult { scheduleState { status } }
    ... on PythonError { message }
  }
}
"""
ACTIVE_RUNS = "{ runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED]}) { ... on Runs { count } } }"


def _quiet_scheduler(port: int, deadline: float) -> None:
    """Stop every schedule and wait out any run one launched: the processing schedule fires every five minutes,
    and a run it started between the test's ingest and its own launch took the events first (seen once)."""
    selector = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}
    schedules = graphql(port, SCHEDULES, {"selector": selector})["schedulesOrError"]["results"]
    assert schedules
    for schedule in schedules:
        stopped = graphql(port, STOP_SCHEDULE, {"id": schedule["id"]})["stopRunningSchedule"]
        assert stopped.get("scheduleState", {}).get("status") == "STOPPED", (schedule["name"], stopped)
    while graphql(port, ACTIVE_RUNS)["runsOrError"]["count"]:
        assert time.monotonic() < deadline, "a scheduled run did not finish"
        time.sleep(1)


def test_a_run_launched_through_graphql_materializes_and_its_checks_report(
    dagster_dev: int, db_url: str, tmp_path: Path
) -> None:
    _quiet_scheduler(dagster_dev, time.monotonic() + 240)
    assert graphql(dagster_dev, "{ shouldShowNux }") == {"shouldShowNux": False}  # dagster.yaml: nux off
    log = tmp_path / "cowrie.json"
    write_corrupted_log(log, n_events=300, seed=2, corruption_rate=0.4)
    ingest_paths([log], url=db_url)
    params = {
        "selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__",
                     "jobName": "dlq_processing_job"},
        "runConfigData": {"ops": {"dlq_processed_batches": {"config": {"time_budget_seconds": 60}}}},
    }  # fmt: skip
    launched = graphql(dagster_dev, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        status = graphql(dagster_dev, RUN, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(2)
    assert status == "SUCCESS", status
    node = settled_asset_node(dagster_dev, CHECKS, time.monotonic() + 60)
    metadata = {e["label"]: e.get("intValue") for e in node["assetMaterializations"][0]["metadataEntries"]}
    assert metadata["repaired"] > 0 and metadata["processed"] >= metadata["repaired"]
    checks = {c["name"]: c for c in node["assetChecksOrError"]["checks"]}
    assert {"stale_locks", "breaker_open", "tampered_events", "high_retry_events"} <= set(checks)
    for name in ("stale_locks", "breaker_open", "tampered_events"):
        execution = checks[name]["executionForLatestMaterialization"]
        assert execution["status"] == "SUCCEEDED" and execution["evaluation"]["success"], (name, execution)
        assert checks[name]["blocking"]
    with psycopg.connect(db_url) as conn:  # the run really worked the DLQ behind the API
        assert (
            conn.execute("SELECT count(*) FROM dead_letter_events WHERE resolved").fetchone()[0] == metadata["repaired"]
        )
