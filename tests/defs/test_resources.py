"""Which database the code location uses: the one it is told, resolved at first use, never one nobody named.

No URL anywhere: the definitions load, and the first run, check or sensor tick that needs the database fails with
one line naming DLQ_DATABASE_URL. ``DLQ_DATABASE_URL=embedded`` (or ``url="embedded"``) asks for the embedded
server by name, through ``devtools.embedded.resolve_url``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from dlq_assets.core import db
from dlq_assets.core.migrations import discover
from dlq_assets.defs.alerts.checks import health_checks
from dlq_assets.defs.processing.sensors import backlog_sensor
from dlq_assets.defs.resources import DLQDatabase
from dlq_assets.defs.schema.assets import dlq_schema
from dlq_assets.devtools import embedded

REPO_ROOT = Path(__file__).resolve().parents[2]
NOT_CONFIGURED = (
    "no DLQ database: set DLQ_DATABASE_URL to a postgresql:// URL (DLQ_DATABASE_URL=embedded for a local embedded "
    "server)"
)


@pytest.fixture
def no_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(db.URL_ENV, raising=False)


@pytest.fixture
def embedded_calls(monkeypatch: pytest.MonkeyPatch, db_url: str) -> list[str | None]:
    """Stands in for the embedded server: records each resolve_url call and answers with the test database."""
    calls: list[str | None] = []

    def resolve_url(url: str | None = None) -> str:
        calls.append(url)
        return db_url

    monkeypatch.setattr(embedded, "resolve_url", resolve_url)
    return calls


@dg.asset(name="dlq_processed_batches")
def processed_batches() -> None:
    """Stands in for the real asset: the checks judge the database."""


def step_failures(result: dg.ExecuteInProcessResult) -> dict[str, str | None]:
    return {e.step_key: e.step_failure_data.user_failure_data.description for e in result.get_step_failure_events()}


def test_the_resource_fails_at_first_use_with_one_line(no_database: None) -> None:
    database = DLQDatabase()  # built, as the definitions build it, without a database
    with pytest.raises(dg.Failure) as failure:
        database.connect()
    assert failure.value.description == NOT_CONFIGURED and "\n" not in NOT_CONFIGURED
    assert failure.value.__cause__ is None and failure.value.__suppress_context__  # nothing chained below the line
    assert not failure.value.allow_retries  # only a change of configuration can fix it


def test_a_run_fails_its_step_with_the_line(no_database: None) -> None:
    result = dg.materialize([dlq_schema], resources={"database": DLQDatabase()}, raise_on_error=False)
    assert not result.success
    assert step_failures(result) == {"dlq_schema": NOT_CONFIGURED}


def test_each_check_fails_with_the_line(no_database: None) -> None:
    result = dg.materialize(
        [processed_batches, *health_checks], resources={"database": DLQDatabase()}, raise_on_error=False
    )
    failures = step_failures(result)
    assert len(failures) == len(health_checks) and set(failures.values()) == {NOT_CONFIGURED}
    assert result.get_asset_check_evaluations() == []


def test_a_sensor_tick_fails_with_the_line(no_database: None) -> None:
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance, resources={"database": DLQDatabase()}) as context,
        pytest.raises(dg.Failure, match="DLQ_DATABASE_URL") as failure,
    ):
        backlog_sensor(context)
    assert failure.value.description == NOT_CONFIGURED


def test_the_definitions_load_and_validate_without_a_database(no_database: None) -> None:
    """As the operator runs it, from the project root with nothing set: no database, no Dagster storage URL."""
    env = {k: v for k, v in os.environ.items() if k not in (db.URL_ENV, "DLQ_DAGSTER_STORAGE_URL", "DAGSTER_HOME")}
    dagster = Path(sys.executable).with_name("dagster")
    result = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "dlq_assets.definitions"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All code locations passed validation" in result.stdout + result.stderr


def test_a_url_that_is_not_postgresql_fails_with_one_line_and_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(db.URL_ENV, "mysql://app:s3cret@db/dlq")
    with pytest.raises(dg.Failure) as failure:
        DLQDatabase().resolved_url()
    assert "not a PostgreSQL URL" in failure.value.description and "s3cret" not in failure.value.description


def test_the_environment_url_is_used_and_the_field_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(db.URL_ENV, "postgresql+psycopg://app@db-a/dlq")
    assert DLQDatabase().resolved_url() == "postgresql://app@db-a/dlq"
    assert DLQDatabase(url="postgresql://app@db-b/dlq").resolved_url() == "postgresql://app@db-b/dlq"


def test_embedded_in_the_environment_resolves_through_resolve_url(
    monkeypatch: pytest.MonkeyPatch, embedded_calls: list[str | None], db_url: str
) -> None:
    monkeypatch.setenv(db.URL_ENV, db.EMBEDDED)
    result = dg.materialize([dlq_schema], resources={"database": DLQDatabase()})
    assert result.success and embedded_calls == [db.EMBEDDED]


def test_embedded_in_the_field_resolves_through_resolve_url(
    monkeypatch: pytest.MonkeyPatch, embedded_calls: list[str | None], db_url: str
) -> None:
    monkeypatch.setenv(db.URL_ENV, "postgresql://app@elsewhere/dlq")  # the field wins over the environment
    database = DLQDatabase(url=db.EMBEDDED)
    assert database.resolved_url() == db_url and database.resolved_url() == db_url
    assert embedded_calls == [db.EMBEDDED]  # resolved once per resource instance


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A throwaway embedded cluster's data dir (short path: the server's unix socket lives under it)."""
    path = Path(tempfile.mkdtemp(prefix="dlq-test-")) / "pgdata"
    monkeypatch.setenv("DLQ_DATA_DIR", str(path))
    try:
        yield path
    finally:
        embedded.remove_cluster(path)
        shutil.rmtree(path.parent, ignore_errors=True)


def test_explicit_embedded_starts_the_embedded_server_and_migrates_it(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    monkeypatch.setenv(db.URL_ENV, db.EMBEDDED)
    result = dg.materialize([dlq_schema], resources={"database": DLQDatabase()})
    (materialization,) = result.asset_materializations_for_node("dlq_schema")
    assert materialization.metadata["schema_version"].value == discover()[-1].version
    status = embedded.EmbeddedServer(data_dir).status()
    assert status.running and str(status.socket_dir).startswith(str(data_dir.parent))
