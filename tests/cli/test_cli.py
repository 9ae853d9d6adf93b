"""The dlq CLI driven for real: output and database effects."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from dlq_assets.cli import main
from dlq_assets.core.migrations import discover, discover_functions
from tests.reliability.conftest import wait_until


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_create_applies_then_reports_nothing_to_do(empty_db_url: str) -> None:
    code, out = run("--database-url", empty_db_url, "create", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["applied"] == [m.name for m in discover()]
    code, out = run("--database-url", empty_db_url, "create")
    assert code == 0 and "applied: nothing" in out


def test_ingest_and_health_commit_their_work(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "cowrie.json"
    log.write_text(
        '{"eventid": "cowrie.session.connect", "timestamp": "2024-01-15T10:30:00Z", "session": "3f2a9c0b1d4e"}\n'
        "garbage line\n"
    )
    code, out = run("--database-url", db_url, "ingest", str(log), "--json")
    assert code == 0
    report = json.loads(out)
    assert (report["raw_inserted"], report["dlq_inserted"]) == (1, 1)
    with psycopg.connect(db_url) as conn:  # a new connection sees it: committed
        assert conn.execute("SELECT count(*) FROM dead_letter_events").fetchone() == (1,)
    code, out = run("--database-url", db_url, "health", "--json")
    assert code == 0 and json.loads(out)["pending_events"] == 1


def test_demo_generates_ingests_and_accounts_for_every_record(empty_db_url: str, tmp_path: Path) -> None:
    code, out = run("--database-url", empty_db_url, "demo", "--events", "300", "--out", str(tmp_path), "--json")
    assert code == 0, out
    data = json.loads(out)
    ingest = data["ingest"]
    assert ingest["records"] == data["records_written"] or ingest["records"] > 0
    assert ingest["raw_inserted"] + ingest["dlq_inserted"] == ingest["records"]
    assert sum(data["dlq_by_reason"].values()) == ingest["dlq_inserted"] == data["health"]["total_events"]


def test_errors_are_one_clear_line_without_secrets(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--database-url", "postgresql://dlq:hunter2@127.0.0.1:1/x?connect_timeout=2", "health"]
    )
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert "hunter2" not in result.output and "Traceback" not in result.output


def test_db_status_start_stop_on_a_private_cluster(tmp_path: Path) -> None:
    env = {"DLQ_DATA_DIR": str(tmp_path / "pgdata"), "DLQ_DATABASE_URL": ""}
    try:
        code, out = run("db", "status", "--json", env=env)
        assert code == 3 and json.loads(out)["running"] is False
        code, out = run("db", "start", "--json", env=env)
        assert code == 0 and json.loads(out)["running"] is True
        with psycopg.connect(json.loads(out)["url"]) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("dlq",)
        assert run("db", "status", env=env)[0] == 0
    finally:
        assert run("db", "stop", env=env) == (0, "stopped\n")
    assert run("db", "stop", env=env) == (0, "not running\n")


def test_python_m_entry_point_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dlq_assets.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "ingest" in result.stdout and "create" in result.stdout


def snapshot(url: str) -> dict[str, list]:
    tables = ("dead_letter_events", "dlq_poison_events", "raw_events", "dlq_idempotency_keys", "dlq_processing_metrics")
    with psycopg.connect(url) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}


def test_process_redrive_and_cleanup_write_and_their_dry_runs_do_not(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "cowrie.json"
    code, _ = run("--database-url", db_url, "demo", "--events", "200", "--out", str(tmp_path), "--json")
    assert code == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE dlq_retry_policies SET max_attempts = 1 WHERE error_class = 'unrepairable'")
        conn.execute("UPDATE dead_letter_events SET next_attempt_at = now() WHERE NOT resolved")
    code, out = run("--database-url", db_url, "process", "--json", "--batch-size", "50")
    assert code == 0
    processed = json.loads(out)
    assert processed["poisoned"] > 0 and processed["processed"] == processed["poisoned"]

    before = snapshot(db_url)
    code, out = run("--database-url", db_url, "redrive", "--reason", "truncated", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["redriven_count"] > 0
    assert snapshot(db_url) == before  # the dry run wrote nothing
    code, out = run("--database-url", db_url, "redrive", "--reason", "truncated", "--json")
    assert code == 0
    with psycopg.connect(db_url) as conn:
        back = conn.execute("SELECT count(*) FROM dead_letter_events WHERE reason = 'truncated' AND NOT resolved")
        assert back.fetchone()[0] == json.loads(out)["redriven_count"]

    with psycopg.connect(db_url, autocommit=True) as conn:  # age the resolved events past the retention period
        conn.execute("UPDATE dead_letter_events SET resolved_at = now() - interval '100 days' WHERE resolved")
    before = snapshot(db_url)
    code, out = run("--database-url", db_url, "cleanup", "--older-than-days", "90", "--dry-run", "--json")
    would = json.loads(out)["rows_deleted"]
    assert code == 0 and would > 0
    assert snapshot(db_url) == before
    code, out = run("--database-url", db_url, "cleanup", "--older-than-days", "90", "--json")
    assert code == 0 and json.loads(out)["rows_deleted"] == would
    with psycopg.connect(db_url) as conn:  # committed: another connection sees it
        assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE resolved").fetchone() == (0,)
    assert log.parent.exists()


def test_process_exits_4_when_the_breaker_is_open(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT dlq_breaker_set('dlq_processing', 'open')")
    code, out = run("--database-url", db_url, "process")
    assert code == 4 and "circuit breaker is open" in out


def demo_db(db_url: str, tmp_path: Path) -> None:
    code, out = run("--database-url", db_url, "demo", "--events", "200", "--out", str(tmp_path), "--json")
    assert code == 0, out


def test_health_exits_5_when_a_threshold_is_breached(db_url: str, tmp_path: Path) -> None:
    demo_db(db_url, tmp_path)
    code, out = run("--database-url", db_url, "health", "--json")
    assert code == 0 and json.loads(out)["breaches"] == {}
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE dead_letter_events SET processing_lock = gen_random_uuid(), "
            "lock_expires_at = now() - interval '1 m' "
            "WHERE id = (SELECT min(id) FROM dead_letter_events WHERE NOT resolved)"
        )
    code, out = run("--database-url", db_url, "health")
    assert code == 5 and "BREACHED stale_locks: 1 expired leases still held" in out
    assert run("--database-url", db_url, "health", "--max-stale-locks", "1")[0] == 0


def test_analyze_prints_patterns_and_writes_a_chart(db_url: str, tmp_path: Path) -> None:
    demo_db(db_url, tmp_path)
    chart = tmp_path / "chart.png"
    code, out = run("--database-url", db_url, "analyze", "--chart", str(chart), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["summary"]["total_events"] > 0 and data["by_reason"] and data["chart"] == str(chart)
    assert chart.read_bytes().startswith(b"\x89PNG")
    code, out = run("--database-url", db_url, "analyze", "--top", "3")
    assert code == 0 and "| reason |" in out


def test_inspect_shows_history_checksum_and_poisoned_events(db_url: str, tmp_path: Path) -> None:
    demo_db(db_url, tmp_path)
    with psycopg.connect(db_url, autocommit=True) as conn:
        (pending,) = conn.execute("SELECT min(id) FROM dead_letter_events WHERE NOT resolved").fetchone()
    code, out = run("--database-url", db_url, "inspect", str(pending), "--json")
    data = json.loads(out)
    assert code == 0 and data["checksum_ok"] and data["error_history"] and data["processing_attempts"]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE dead_letter_events SET payload = '{\"x\": 1}' WHERE id = %s", (pending,))
    code, out = run("--database-url", db_url, "inspect", str(pending))
    assert code == 0 and "MISMATCH" in out
    assert run("--database-url", db_url, "inspect", "999999")[0] == 6


def test_locks_lists_leases_and_releases_stale_ones(db_url: str, tmp_path: Path) -> None:
    demo_db(db_url, tmp_path)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE dead_letter_events SET next_attempt_at = now() WHERE NOT resolved")
        conn.execute("SELECT * FROM dlq_claim_events(3, 1)")
        conn.execute(
            "UPDATE dead_letter_events SET lock_expires_at = now() - interval '1 s' WHERE processing_lock IS NOT NULL"
        )
    code, out = run("--database-url", db_url, "locks", "--json")
    (lease,) = json.loads(out)["leases"]
    assert code == 0 and lease["events"] == 3 and lease["stale"]
    code, out = run("--database-url", db_url, "locks", "--release-stale", "--json")
    assert code == 0 and json.loads(out) == {"released": 3, "leases": []}


def test_locks_shows_transaction_leases_live_then_dead_and_releases_them(db_url: str, tmp_path: Path) -> None:
    demo_db(db_url, tmp_path)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE dead_letter_events SET next_attempt_at = now() WHERE NOT resolved")
        batch = psycopg.connect(db_url)
        lease = uuid.uuid4()
        ids = [i for (i,) in batch.execute("SELECT id FROM dlq_claim_batch(%s, 4)", (lease,))]
        conn.execute("SELECT dlq_journal_batch(%s, %s, 'cli-test')", (lease, ids))
        code, out = run("--database-url", db_url, "locks", "--json")
        assert code == 0 and json.loads(out)["leases"] == [
            {"lease": str(lease), "kind": "transaction", "events": 4, "expires_at": None, "stale": False,
             "worker": "cli-test"}
        ]  # fmt: skip
        batch.close()  # the holder goes away without completing: its batch is dead
        wait_until(lambda: run("--database-url", db_url, "locks", "--json")[1].count('"stale": true') == 1, "stale")
    code, out = run("--database-url", db_url, "locks", "--release-stale", "--json")
    assert code == 0 and json.loads(out) == {"released": 4, "leases": []}


def test_breaker_commands_change_the_shared_state(db_url: str) -> None:
    code, out = run("--database-url", db_url, "breaker", "open", "--name", "target", "--json")
    assert code == 0 and json.loads(out)["state"] == "open"
    assert (
        json.loads(run("--database-url", db_url, "breaker", "status", "--name", "target", "--json")[1])["state"]
        == "open"
    )
    assert (
        json.loads(run("--database-url", db_url, "breaker", "reset", "--name", "target", "--json")[1])["state"]
        == "closed"
    )


def test_monitor_json_emits_a_line_per_refresh(db_url: str) -> None:
    code, out = run("--database-url", db_url, "monitor", "--duration", "0.02", "--interval", "0.5", "--json")
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and len(lines) >= 2 and {"pending_events", "last_minute", "breaches"} <= set(lines[0])


def test_every_command_has_help() -> None:
    commands = ["create", "ingest", "process", "redrive", "cleanup", "health", "monitor", "analyze", "inspect",
                "locks", "breaker", "demo", "dev", "db"]  # fmt: skip
    for command in commands:
        code, out = run(command, "--help")
        assert code == 0 and "Usage:" in out, command


def test_a_command_on_a_database_without_the_schema_says_to_create_it(empty_db_url: str) -> None:
    for command in (["health"], ["locks"], ["breaker", "status"]):
        result = CliRunner().invoke(main, ["--database-url", empty_db_url, *command])
        assert result.exit_code == 1 and "`dlq create` creates or upgrades it" in result.output, result.output


def test_create_reports_the_function_files_it_applies(empty_db_url: str) -> None:
    first = json.loads(CliRunner().invoke(main, ["--database-url", empty_db_url, "create", "--json"]).output)
    assert first["functions"] == [f.name for f in discover_functions()] and first["restored"] == []
    again = json.loads(CliRunner().invoke(main, ["--database-url", empty_db_url, "create", "--json"]).output)
    assert again["applied"] == [] and again["functions"] == []


@pytest.mark.parametrize(
    "args",
    [["process", "--time-budget", "nan"], ["process", "--time-budget", "0"],
     ["process", "--limit", "99999999999999999999"],
     ["redrive", "--id", "9223372036854775808", "--dry-run"],
     ["redrive", "--reason", "x", "--max-redrives", "3000000000"],
     ["demo", "--corruption-rate", "nan"], ["analyze", "--since-hours", "inf"]],
)  # fmt: skip
def test_numbers_out_of_range_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["--database-url", "postgresql://nobody@127.0.0.1:1/none", *args])
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output
