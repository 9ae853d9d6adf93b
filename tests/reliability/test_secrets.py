"""Secrets: a password in the database URL never shows in CLI output or errors, logs, or Dagster events and
metadata, whether the connection fails or works (a trust-auth test server ignores the password)."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import pytest
from click.testing import CliRunner, Result

from dlq_assets.cli import main
from dlq_assets.core import db
from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.core.migrations import migrate
from dlq_assets.core.operations.redrive import redrive
from dlq_assets.core.operations.retention import run_retention
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.pool import process
from dlq_assets.defs.analysis.assets import dlq_failure_patterns
from dlq_assets.defs.processing.assets import dlq_processed_batches
from dlq_assets.defs.resources import CircuitBreaker, DLQDatabase
from dlq_assets.defs.retention.assets import dlq_retention_state
from dlq_assets.defs.schema.assets import dlq_schema
from dlq_assets.devtools.generator import write_corrupted_log
from tests.reliability.conftest import with_params, with_password

pytestmark = pytest.mark.reliability

SECRET = "s3cr3t-PASS"
UNREACHABLE = {  # every way a password can ride along, on a port nothing listens on
    "userinfo": f"postgresql://dlq:{SECRET}@127.0.0.1:1/x?connect_timeout=2",
    "query": f"postgresql://dlq@127.0.0.1:1/x?connect_timeout=2&password={SECRET}",
    "sqlalchemy": f"postgresql+psycopg2://dlq:{SECRET}@127.0.0.1:1/x?connect_timeout=2",
    "encoded": f"postgresql://dlq:{quote(SECRET + '@:/%', safe='')}@127.0.0.1:1/x?connect_timeout=2",
    "unencoded": f"postgresql://dlq:{SECRET}/@:x@127.0.0.1:1/x?connect_timeout=2",
    "keywords": f"host=127.0.0.1 port=1 user=dlq password={SECRET} connect_timeout=2",
    "malformed": f"postgresql://dlq:{SECRET}@[::1/x",
}


def commands(tmp_path: Path) -> list[list[str]]:
    """Every command that connects to the database."""
    log = tmp_path / "cowrie.json"
    log.write_text('{"eventid": "cowrie.session.connect"}\n')
    return [
        ["create"], ["ingest", str(log)], ["process"], ["redrive", "--id", "1"], ["redrive", "--id", "1", "--dry-run"],
        ["cleanup"], ["cleanup", "--dry-run"], ["health"], ["monitor", "--duration", "0.01", "--json"], ["analyze"],
        ["inspect", "1"], ["locks"], ["locks", "--release-stale"], ["breaker", "status"], ["breaker", "open"],
        ["demo", "--events", "5", "--out", str(tmp_path / "demo")],
    ]  # fmt: skip


def assert_no_secret(text: str) -> None:
    assert SECRET not in text and quote(SECRET) not in text, text


def shown(result: Result) -> str:
    """Everything a person sees: output, and any traceback."""
    if result.exc_info is None or isinstance(result.exception, SystemExit):
        return result.output
    return result.output + "".join(traceback.format_exception(*result.exc_info))


@pytest.mark.parametrize("url", UNREACHABLE.values(), ids=UNREACHABLE.keys())
def test_failing_commands_never_show_the_password(url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    for args in commands(tmp_path):
        for result in (
            runner.invoke(main, ["--database-url", url, *args]),
            runner.invoke(main, args, env={db.URL_ENV: url}),
        ):
            assert result.exit_code == 1, (args, result.output)
            errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and "Traceback" not in result.output, (args, result.output)
            assert_no_secret(result.output)
        debug = runner.invoke(main, ["--database-url", url, "--debug", *args])
        assert debug.exit_code != 0
        assert_no_secret(shown(debug))  # the traceback --debug shows, too
    assert_no_secret(caplog.text)


@pytest.mark.parametrize("url", UNREACHABLE.values(), ids=UNREACHABLE.keys())
def test_failing_library_calls_and_dagster_runs_never_show_the_password(url: str, tmp_path: Path) -> None:
    calls = [
        lambda: migrate(url),
        lambda: ingest_paths([tmp_path], url=url),
        lambda: process(url, WorkerConfig()),
        lambda: run_retention(url),
        lambda: redrive(url, ids=[1]),
    ]
    for call in calls:
        with pytest.raises(Exception) as caught:  # any error, as long as it keeps the secret
            call()
        assert_no_secret("".join(traceback.format_exception(caught.value)))
    result = dg.materialize([dlq_schema], resources={"database": DLQDatabase(url=url)}, raise_on_error=False)
    assert not result.success
    assert_no_secret(repr(result.all_events))


def test_working_commands_logs_and_dagster_never_show_the_password(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    log = tmp_path / "cowrie.json"
    write_corrupted_log(log, n_events=200, seed=4, corruption_rate=0.5)
    runner = CliRunner()
    for url in (with_password(db_url, SECRET), with_params(db_url, password=SECRET)):
        for args in (["create", "--json"], ["ingest", str(log)], ["process", "--json"], ["health"], ["analyze"],
                     ["inspect", "1", "--json"], ["locks"], ["breaker", "status"], ["cleanup", "--dry-run"],
                     ["redrive", "--reason", "x", "--dry-run"], ["monitor", "--duration", "0.01", "--json"],
                     ["demo", "--events", "20", "--out", str(tmp_path / "demo"), "--json"]):  # fmt: skip
            result = runner.invoke(main, ["--database-url", url, *args])
            # 5: health found a breach; 6: inspect's event retired by the first round's retention
            assert result.exit_code in (0, 5, 6), (args, result.output)
            assert_no_secret(result.output)
        ingest_paths([log], url=url)
        process(url, WorkerConfig(batch_size=50, min_batch_size=10))
        run_retention(url, older_than_days=0)
        redrive(url, reason="x")
        resources = {"database": DLQDatabase(url=url), "breaker": CircuitBreaker()}
        result = dg.materialize(
            [dlq_schema, dlq_processed_batches, dlq_failure_patterns, dlq_retention_state], resources=resources
        )
        assert result.success
        assert_no_secret(repr(result.all_events))
        assert_no_secret(repr(result.dagster_run))
        for node in ("dlq_schema", "dlq_processed_batches", "dlq_failure_patterns", "dlq_retention_state"):
            for materialization in result.asset_materializations_for_node(node):
                assert_no_secret(repr(materialization.metadata))
    assert_no_secret(caplog.text)
    out, err = capfd.readouterr()
    assert_no_secret(out + err)


@pytest.mark.parametrize("url", [*UNREACHABLE.values(), "postgresql://u@h/x", "postgresql://h/x"])
def test_redact_removes_every_password(url: str) -> None:
    assert_no_secret(db.redact(url))
