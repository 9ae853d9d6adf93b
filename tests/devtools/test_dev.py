"""`dlq dev` stops when told to, however it was started: a script that runs it as a background job (`dlq dev &`)
leaves SIGINT ignored in it, and the Dagster processes it starts must not inherit that."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from dlq_assets.cli import main
from dlq_assets.devtools.dev import dagster_database_for
from tests.conftest import _drop_database
from tests.defs.dagster_dev import dev_environment, free_port


def test_dlq_dev_started_in_the_background_of_a_script_stops_on_sigterm(
    db_url: str, server_url: str, tmp_path: Path
) -> None:
    dagster_database = f"dagster_{uuid.uuid4().hex[:10]}"
    port, pid_file, log = free_port(), tmp_path / "dlq-dev.pid", tmp_path / "dev.log"
    command = shlex.join([sys.executable, "-m", "dlq_assets.cli", "dev", "--port", str(port)])
    env = {**os.environ, **dev_environment(db_url, tmp_path, dagster_database)}
    script = subprocess.Popen(  # non-interactive bash: its background job starts with SIGINT ignored
        ["bash", "-c", f"{command} > {shlex.quote(str(log))} 2>&1 & echo $! > {shlex.quote(str(pid_file))}; wait"],
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5).close()
                break
            except OSError:
                assert script.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        dev = psutil.Process(int(pid_file.read_text()))
        family = [dev, *dev.children(recursive=True)]
        assert len(family) >= 3  # dlq dev, dagster dev, its webserver and daemon (and their code servers)
        dev.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=90)
        assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    finally:
        if script.poll() is None:  # the script and its job share a process group (no job control in bash -c)
            os.killpg(script.pid, signal.SIGKILL)
        _drop_database(server_url, dagster_database)


def test_dlq_dev_refuses_a_port_in_use_and_bad_settings_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DLQ_DATA_DIR", str(tmp_path / "pgdata"))  # nothing may be started there
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            main, ["--database-url", "postgresql://nobody@127.0.0.1:1/x", "dev", "--port", str(port)]
        )
    assert result.exit_code != 0 and f"127.0.0.1:{port} is in use (another `dlq dev`?)" in result.output
    monkeypatch.setenv("DLQ_PROCESSING_RUNS", "0")
    result = CliRunner().invoke(
        main, ["--database-url", "postgresql://nobody@127.0.0.1:1/x", "dev", "--port", str(free_port())]
    )
    assert result.exit_code != 0 and "DLQ_PROCESSING_RUNS must be a whole number from 1 to 16" in result.output
    assert "Dagster UI" not in result.output  # no address announced for a UI that never came up
    assert not (tmp_path / "pgdata").exists()


def test_dagster_storage_is_named_after_the_dlq_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DLQ_DAGSTER_DATABASE", raising=False)
    assert dagster_database_for("postgresql://u:p@db.example:5432/dlq_prod") == "dlq_prod_dagster"
    assert dagster_database_for("postgresql://u@/dlq?host=/tmp/sock") == "dlq_dagster"
    with pytest.raises(ValueError, match="longer than 63 bytes: set DLQ_DAGSTER_DATABASE"):
        dagster_database_for("postgresql://u@h/" + "d" * 60)
    monkeypatch.setenv("DLQ_DAGSTER_DATABASE", "shared_dagster")
    assert dagster_database_for("postgresql://u@h/dlq") == "shared_dagster"
