"""`dlq dev` stops when told to, however it was started: a script that runs it as a background job (`dlq dev &`)
leaves SIGINT ignored in it, and the Dagster processes it starts must not inherit that."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

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
