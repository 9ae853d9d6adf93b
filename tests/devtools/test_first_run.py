"""``dlq demo --dagster``: every asset and its checks materialized on the instance ``dlq dev`` serves, recorded in
its PostgreSQL storage, so the UI opens on a living DLQ."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from dlq_assets.cli import main
from dlq_assets.cli.demo import dagster_summary
from dlq_assets.core import db
from dlq_assets.devtools.first_run import PROCESSING_ROUNDS, first_run_jobs
from tests.conftest import _drop_database

ASSETS = {"dlq_schema", "dlq_partitions", "dlq_processed_batches", "dlq_failure_patterns", "dlq_retention_state"}


def test_the_demo_through_dagster_materializes_every_asset_on_the_dev_instance(
    db_url: str, server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dagster_db = f"dlq_dagster_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DLQ_DAGSTER_DATABASE", dagster_db)
    monkeypatch.setenv("DLQ_DATA_DIR", str(tmp_path / "pgdata"))
    try:
        result = CliRunner().invoke(
            main, ["--database-url", db_url, "demo", "--events", "300", "--out", str(tmp_path), "--dagster", "--json"]
        )
        assert result.exit_code == 0, result.output
        first = json.loads(result.output)["dagster"]
        assert set(first["metadata"]) == ASSETS and set(first["runs"]) == {job.name for job in first_run_jobs()}
        assert len(first["checks"]) == 7
        rounds = first["processing_rounds"]  # the backlog worked in shares: its chart opens on a line, not a point
        assert len(rounds) == PROCESSING_ROUNDS and all(r["processed"] > 0 for r in rounds[:-1])
        pending = [r["backlog_pending"] for r in rounds]
        assert pending == sorted(pending, reverse=True) and pending[0] > pending[-1], pending
        assert first["metadata"]["dlq_processed_batches"] == rounds[-1]
        dagster_summary(first)
        summary = capsys.readouterr().out
        total = sum(r["processed"] for r in rounds)
        assert f"processed through Dagster in 3 runs: {total} dead letters" in summary, summary
        assert "pending after each run: " + " -> ".join(map(str, pending)) in summary
        assert first["dagster_home"] == str(tmp_path / "dagster_home")
        with psycopg.connect(db.with_database(db_url, dagster_db)) as conn:  # the storage `dlq dev` serves
            runs = dict(conn.execute("SELECT run_id, status FROM runs").fetchall())
            assert {runs[run_id] for run_id in first["runs"].values()} == {"SUCCESS"}
            keys = {k for (k,) in conn.execute("SELECT asset_key FROM asset_keys")}
        assert {json.loads(key)[0] for key in keys} >= ASSETS  # stored as a JSON list of path parts
    finally:
        _drop_database(server_url, dagster_db)
