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
from dlq_assets.core import db
from dlq_assets.devtools.first_run import first_run_jobs
from tests.conftest import _drop_database

ASSETS = {"dlq_schema", "dlq_partitions", "dlq_processed_batches", "dlq_failure_patterns", "dlq_retention_state"}


def test_the_demo_through_dagster_materializes_every_asset_on_the_dev_instance(
    db_url: str, server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
        batch = first["metadata"]["dlq_processed_batches"]
        assert batch["processed"] > 0 and batch["backlog_pending"] >= 0
        assert first["dagster_home"] == str(tmp_path / "dagster_home")
        with psycopg.connect(db.with_database(db_url, dagster_db)) as conn:  # the storage `dlq dev` serves
            runs = dict(conn.execute("SELECT run_id, status FROM runs").fetchall())
            assert {runs[run_id] for run_id in first["runs"].values()} == {"SUCCESS"}
            keys = {k for (k,) in conn.execute("SELECT asset_key FROM asset_keys")}
        assert {json.loads(key)[0] for key in keys} >= ASSETS  # stored as a JSON list of path parts
    finally:
        _drop_database(server_url, dagster_db)
