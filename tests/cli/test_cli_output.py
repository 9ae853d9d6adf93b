"""What the dlq CLI prints of values from outside (payloads, paths, names, messages): text, never Rich markup
nor terminal control; ``breaker status`` as a read the reader role may run; a closed output pipe ends quietly."""

from __future__ import annotations

import bz2
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql
from psycopg.types.json import Jsonb

from dlq_assets.cli import main
from dlq_assets.cli.app import EXIT_CLOSED_PIPE
from tests.conftest import left_alone

HOSTILE = "\x1b[31m[b]\t"  # a colour sequence, a Rich style tag and a tab
SHOWN = "\\x1b[31m[b]\\t"  # how the CLI prints it
LOGIN = '{"eventid": "cowrie.session.connect", "timestamp": "2024-01-15T10:30:00Z", "session": "3f2a9c0b1d4e"}\n'


def cli(*args: str) -> Result:
    """The command, with a wide terminal so Rich wraps no table cell and each value is found on one line."""
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": "400"}, catch_exceptions=False)
    assert "\x1b" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    return result


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def ingest_line(db_url: str, path: Path, line: str) -> int:
    path.write_text(line)
    assert cli("--database-url", db_url, "ingest", str(path)).exit_code == 0
    with psycopg.connect(db_url) as conn:
        (event_id,) = conn.execute("SELECT max(id) FROM dead_letter_events").fetchone()
    return event_id


def test_inspect_prints_payload_source_reason_and_history_as_text(db_url: str, tmp_path: Path) -> None:
    event_id = ingest_line(
        db_url, tmp_path / f"{HOSTILE}\n.json", "login attempt [support/support] succeeded [/] \x1b]0;x\x07 \u202e\n"
    )
    with psycopg.connect(db_url, autocommit=True) as conn:  # the processor role writes processing_attempts
        conn.execute(
            "UPDATE dead_letter_events SET reason = '[/]', error_history = %s, processing_attempts = %s WHERE id = %s",
            (Jsonb([{"message": f"boom {HOSTILE}"}]), Jsonb(["[/]", {f"k{HOSTILE}": "v"}]), event_id),
        )
    result = cli("--database-url", db_url, "inspect", str(event_id))
    assert result.exit_code == 0
    out = result.stdout
    assert "login attempt [support/support] succeeded [/] \\u001b]0;x\\u0007 \\u202e" in out
    assert ["source", f"{tmp_path}/{SHOWN}\\n.json"] in rows(out) and ["reason", "[/]"] in rows(out)
    assert f"boom {SHOWN}" in out and f"k{SHOWN}" in out and ["[/]"] in rows(out)


def test_health_monitor_and_breaker_status_print_breaker_names_as_text(db_url: str, conn: psycopg.Connection) -> None:
    conn.execute("SET ROLE dlq_processor_role")  # any processor may name a breaker
    conn.execute("SELECT dlq_breaker_record('[/]', 0, 5)")
    conn.execute("RESET ROLE")
    conn.execute("INSERT INTO dlq_circuit_breaker_state (breaker_name, state) VALUES (%s, 'open')", (HOSTILE,))

    result = cli("--database-url", db_url, "health")
    assert result.exit_code == 5  # open breakers are a breach
    (breached,) = (line for line in result.stdout.splitlines() if line.startswith("BREACHED breaker_open: "))
    assert "[/] is open" in breached and f"{SHOWN} is open" in breached
    assert "'[/]': 'open'" in result.stdout and f"'{SHOWN}': 'open'" in result.stdout  # the open_breakers row

    result = cli("--database-url", db_url, "monitor", "--duration", "0.005", "--interval", "0.1")
    assert result.exit_code == 0 and "[/]=open" in result.stdout and f"{SHOWN}=open" in result.stdout

    for name, shown in (("[/]", "[/]"), (HOSTILE, SHOWN)):
        result = cli("--database-url", db_url, "breaker", "status", "--name", name)
        assert result.exit_code == 0 and ["breaker_name", shown] in rows(result.stdout)


def test_locks_and_analyze_print_workers_and_sources_as_text(db_url: str, tmp_path: Path) -> None:
    ingest_line(db_url, tmp_path / f"{HOSTILE}.json", "garbage\n")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE dead_letter_events SET processing_lock = gen_random_uuid(), lock_expires_at = now() + "
            "interval '1 hour', processing_attempts = %s",
            (Jsonb([{"worker": f"[/]{HOSTILE}"}]),),
        )
    result = cli("--database-url", db_url, "locks")
    assert result.exit_code == 0 and f"[/]{SHOWN}" in result.stdout
    result = cli("--database-url", db_url, "analyze")
    assert result.exit_code == 0 and f"| {tmp_path}/{SHOWN}.json |" in result.stdout


def test_ingest_reports_damaged_and_skipped_entries_and_names_them_as_text(db_url: str, tmp_path: Path) -> None:
    whole = bz2.compress(LOGIN.encode() * 2000, 1)
    (tmp_path / f"{HOSTILE}.json.bz2").write_bytes(whole[:-40])
    left_alone(tmp_path / f"{HOSTILE}.json.bz2")  # cut on purpose: a finished file
    (tmp_path / f"{HOSTILE}.log").write_text("not json\n")
    (tmp_path / "notes.txt").write_text("x\n")
    os.mkfifo(tmp_path / "cowrie.json")

    result = cli("--database-url", db_url, "ingest", str(tmp_path))
    assert result.exit_code == 0
    assert f"damaged: {tmp_path}/{SHOWN}.json.bz2: bzip2 data cut short" in result.stderr
    assert (
        "skipped 3 directory entries: 2 name is not a Cowrie JSON log's; 1 not a regular file (listed in --json)"
        in result.stderr
    )
    assert ["skipped_files", "3"] in rows(result.stdout)

    result = cli("--database-url", db_url, "ingest", str(tmp_path), "--json")
    assert result.exit_code == 0
    skipped = {(s["path"], s["reason"]) for s in json.loads(result.stdout)["skipped_files"]}
    not_a_log = "name is not a Cowrie JSON log's"
    assert skipped == {
        (str(tmp_path / f"{HOSTILE}.log"), not_a_log),
        (str(tmp_path / "notes.txt"), not_a_log),
        (str(tmp_path / "cowrie.json"), "not a regular file"),
    }


def test_an_error_quoting_a_file_name_prints_it_as_text(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / f"{HOSTILE}.fifo")
    result = cli("--database-url", "postgresql://nobody@127.0.0.1:1/x", "ingest", str(tmp_path / f"{HOSTILE}.fifo"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and f"{tmp_path}/{SHOWN}.fifo" in result.stderr


@pytest.fixture
def reader_url(db_url: str, conn: psycopg.Connection) -> Iterator[str]:
    """``db_url`` for a login role whose only rights are dlq_reader's."""
    role = f"dlq_cli_reader_{uuid.uuid4().hex[:12]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE dlq_reader").format(sql.Identifier(role)))
    parts = urlsplit(db_url)
    try:
        yield urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
    finally:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_breaker_status_is_a_read_the_reader_role_may_run(conn: psycopg.Connection, reader_url: str) -> None:
    breakers = "SELECT breaker_name, state FROM dlq_circuit_breaker_state ORDER BY 1"
    before = conn.execute(breakers).fetchall()
    result = cli("--database-url", reader_url, "breaker", "status", "--name", "cold", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["exists"] is False and data["breaker_name"] == "cold" and data["state"] is None
    result = cli("--database-url", reader_url, "breaker", "status", "--name", "cold")
    assert result.exit_code == 0 and result.stdout.startswith("breaker cold has no state yet")
    assert conn.execute(breakers).fetchall() == before  # nothing written

    conn.execute("SELECT dlq_breaker_set('cold', 'open')")
    result = cli("--database-url", reader_url, "breaker", "status", "--name", "cold", "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and (data["exists"], data["state"]) == (True, "open")
    result = cli("--database-url", reader_url, "breaker", "close", "--name", "cold")
    assert result.exit_code == 1 and "permission denied" in result.stderr


@pytest.mark.parametrize(
    "command",
    [["analyze"], ["health"], ["breaker", "status", "--json"], ["monitor", "--duration", "0.005", "--interval", "0.1"]],
)
def test_output_into_a_closed_pipe_ends_quietly(db_url: str, command: list[str]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "dlq_assets.cli", "--database-url", db_url, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader goes away before the first write (dlq analyze | head, head done)
    stderr = process.stderr.read()
    assert (process.wait(timeout=120), stderr.decode()) == (EXIT_CLOSED_PIPE, "")


def test_ingest_names_the_end_it_holds_back_of_a_file_being_written(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / f"{HOSTILE}.json"
    log.write_text(LOGIN + LOGIN[:30])
    result = cli("--database-url", db_url, "ingest", str(log))
    assert result.exit_code == 0
    assert (f"held back: {tmp_path}/{SHOWN}.json: its last record is cut where the data ends and the file changed "
            f"in the last 5 minutes, so it is being written: the next ingest reads it from offset {len(LOGIN)}"
            ) in result.stderr  # fmt: skip
    assert ["held_back", "1"] in rows(result.stdout) and ["records", "1"] in rows(result.stdout)


def test_ingest_names_a_log_truncated_in_place_since_its_last_read(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / f"{HOSTILE}.json"
    log.write_text(LOGIN)
    assert cli("--database-url", db_url, "ingest", str(log)).exit_code == 0
    os.truncate(log, 0)
    result = cli("--database-url", db_url, "ingest", str(log))
    assert result.exit_code == 0
    assert (f"rewritten: {tmp_path}/{SHOWN}.json: truncated in place and written again since its last ingest "
            "(smaller, first bytes differ): its content is read as generation 2, keyed apart from what was read "
            "before") in result.stderr  # fmt: skip
    assert ["rewritten_files", "1"] in rows(result.stdout)
