"""``dlq dev``: the Dagster webserver and daemon on the DLQ's PostgreSQL, with nothing to configure by hand.

Starts or joins the embedded server (or uses DLQ_DATABASE_URL), provisions Dagster's database beside the DLQ's
(``dlq_dagster`` beside ``dlq``: one per DLQ database) for its run, event and schedule storage, prepares
``$DAGSTER_HOME`` with the project's dagster.yaml plus PostgreSQL storage, and runs ``dagster dev`` on 127.0.0.1.
SIGTERM or Ctrl-C stops Dagster; the embedded server keeps running for the next command (`dlq db stop`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from dlq_assets.core import db
from dlq_assets.core.migrations import migrate
from dlq_assets.devtools.embedded import default_data_dir, resolve_url

DAGSTER_DATABASE_SUFFIX = "_dagster"  # Dagster's database is named after the DLQ's: dlq -> dlq_dagster
DAGSTER_DATABASE_ENV = "DLQ_DAGSTER_DATABASE"  # another name for Dagster's database (tests use their own)
STORAGE_URL_ENV = "DLQ_DAGSTER_STORAGE_URL"
# The URL must be postgresql+psycopg2://: with SQLAlchemy 2.1 a plain postgresql:// selects psycopg 3, and
# Dagster's LISTEN/NOTIFY breaks on it. prepare() builds it.
STORAGE = f"""storage:
  postgres:
    postgres_url:
      env: {STORAGE_URL_ENV}
"""


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def dagster_database_for(dlq_url: str) -> str:
    """Dagster's storage for this DLQ database: its own per DLQ database, so two deployments on one server never
    share runs, schedules and daemons (each would launch the other's runs against its own data)."""
    name = os.environ.get(DAGSTER_DATABASE_ENV) or db.database_name(dlq_url) + DAGSTER_DATABASE_SUFFIX
    if len(name.encode()) > 63:  # PostgreSQL would cut the name it creates, and the URL would name another
        raise ValueError(f"Dagster's database name {name!r} is longer than 63 bytes: set {DAGSTER_DATABASE_ENV}")
    return name


def check_settings() -> None:
    """The processing settings the schedule and sensor read, refused here rather than failing every tick."""
    from dlq_assets.defs.processing.jobs import processing_runs
    from dlq_assets.defs.processing.sensors import backlog_threshold

    processing_runs()
    backlog_threshold()


def check_port_free(host: str, port: int) -> None:
    """A webserver already on the port (another `dlq dev`?) would leave this one's daemon running beside it."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(f"{host}:{port} is in use (another `dlq dev`?): stop it or choose --port") from exc


def prepare(url: str | None = None, *, dagster_home: Path | None = None) -> dict[str, str]:
    """The environment for Dagster: DLQ database migrated, Dagster's database created, DAGSTER_HOME ready."""
    check_settings()
    dlq_url = resolve_url(url)
    migrate(dlq_url)
    dagster_database = dagster_database_for(dlq_url)
    db.ensure_database(db.with_database(dlq_url, "postgres"), dagster_database)
    home = dagster_home or default_data_dir().parent / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    settings = (project_root() / "dagster.yaml").read_text(encoding="utf-8")
    (home / "dagster.yaml").write_text(settings.rstrip("\n") + "\n\n" + STORAGE, encoding="utf-8")
    return {
        db.URL_ENV: dlq_url,
        STORAGE_URL_ENV: db.sqlalchemy_url(db.with_database(dlq_url, dagster_database), "psycopg2"),
        "DAGSTER_HOME": str(home),
    }


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(
    url: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 3000,
    dagster_home: Path | None = None,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Run ``dagster dev`` until it exits or is told to stop; returns its exit code. ``announce`` gets the UI's
    address once everything it needs is ready. The embedded server is left running for the next command (other
    clients may be using it): `dlq db stop` stops it."""
    check_port_free(host, port)
    env = {**os.environ, **prepare(url, dagster_home=dagster_home)}
    command = [
        str(Path(sys.executable).with_name("dagster")), "dev", "-w", str(project_root() / "workspace.yaml"),
        "-h", host, "-p", str(port),
    ]  # fmt: skip
    # SIGINT back to its default in the child: a shell that starts `dlq dev &` ignores it, the child would inherit
    # that, and dagster dev could not be stopped by the SIGINT forwarded below.
    proc = subprocess.Popen(command, env=env, cwd=project_root(), preexec_fn=_default_sigint)
    if announce:
        announce(f"http://{host}:{port}")

    def stop(signum: int, frame: FrameType | None) -> None:
        proc.send_signal(signal.SIGINT)  # dagster dev shuts its webserver and daemon down on SIGINT

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.kill()
