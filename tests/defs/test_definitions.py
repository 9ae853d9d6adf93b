"""The Dagster code location loads, validates, and holds what the operator expects."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import dagster as dg

from dlq_assets.definitions import defs
from dlq_assets.defs.processing.assets import ProcessingConfig

ASSETS = {"dlq_schema", "dlq_partitions", "dlq_processed_batches", "dlq_failure_patterns", "dlq_retention_state"}
CHECKS = {"high_retry_events", "stale_locks", "backlog_age", "breaker_open", "tampered_events", "malicious_events",
          "success_rate"}  # fmt: skip


def test_definitions_load_and_validate_without_deprecation_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSETS
    assert {k.name for k in graph.asset_check_keys} == CHECKS


def test_jobs_schedules_and_sensors_with_their_default_state() -> None:
    schedules = {s.name: s for s in defs.schedules}
    assert {s.cron_schedule for s in schedules.values()} >= {"*/5 * * * *", "7 * * * *", "30 3 * * *"}
    assert all(s.default_status == dg.DefaultScheduleStatus.RUNNING for s in schedules.values())
    sensors = {s.name for s in defs.sensors}
    assert sensors == {"backlog_sensor", "check_failure_alert_sensor", "run_failure_alert_sensor"}
    for job in ("dlq_processing_job", "dlq_analysis_job", "dlq_retention_job", "dlq_partitions_job",
                "dlq_health_checks_job", "dlq_schema_job"):  # fmt: skip
        assert defs.resolve_job_def(job).tags["dlq/job"] == job
    # a stuck processing run is failed by run monitoring, which frees its slot; no budget reaches that long
    assert defs.resolve_job_def("dlq_processing_job").tags["dagster/max_runtime"] == "3600"
    assert ProcessingConfig.model_fields["time_budget_seconds"].metadata[-1].le == 3000


def test_importing_the_code_location_does_no_io() -> None:
    """No database, no environment: importing the definitions must not connect or read settings."""
    code = (
        "import os, socket\n"
        "os.environ['DLQ_DATABASE_URL'] = 'postgresql://nobody@127.0.0.1:1/none'\n"
        "def refuse(*a, **k): raise AssertionError('I/O at import time')\n"
        "socket.socket.connect = refuse\n"
        "import dlq_assets.definitions\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_package_uses_only_dagsters_public_namespace() -> None:
    """``dagster._*`` modules are Dagster's internals: they change without deprecation."""
    package = Path(__file__).resolve().parents[2] / "dlq_assets"
    private = re.compile(r"\bdagster\._")
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert found == []


def test_dg_loads_the_project_as_its_code_location() -> None:
    """``[tool.dg]`` in pyproject.toml: ``dg check defs`` loads dlq_assets.definitions, from the checkout."""
    env = {**os.environ, "DLQ_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "VIRTUAL_ENV": sys.prefix}
    env.pop("DAGSTER_HOME", None)
    dg_cli = Path(sys.executable).with_name("dg")
    result = subprocess.run(
        [str(dg_cli), "check", "defs"], cwd=Path(__file__).resolve().parents[2], env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "All definitions loaded successfully" in result.stdout, output


def test_the_dagster_layer_and_the_cli_run_no_sql_of_their_own() -> None:
    """Thin layers: every statement lives in the core (dlq_assets/core), where its tests are."""
    package = Path(__file__).resolve().parents[2] / "dlq_assets"
    found = [
        f"{path.relative_to(package)}:{number}"
        for layer in ("defs", "cli")
        for path in sorted((package / layer).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ".execute(" in line
    ]
    assert found == []


def test_a_run_is_one_process_whatever_its_steps() -> None:
    """The health checks are seven steps: in-process, a check run starts no step process of its own."""
    for job in defs.resolve_all_job_defs():
        assert job.executor_def.name == "in_process", job.name
    assert len(defs.resolve_job_def("dlq_health_checks_job").asset_layer.asset_graph.asset_check_keys) == 7
