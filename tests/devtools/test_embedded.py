"""The embedded server: starts or joins, survives a killed server's stale pid file, stops cleanly."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from dlq_assets.core import db
from dlq_assets.devtools.embedded import EmbeddedServer, remove_cluster, resolve_url
from tests.conftest import cluster_dir


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(cluster_dir())
    try:
        yield server
    finally:
        remove_cluster(server.data_dir)
        shutil.rmtree(server.data_dir.parent, ignore_errors=True)


def query(url: str) -> int:
    with psycopg.connect(url, connect_timeout=10) as conn:
        return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_first_start_initialises_then_later_starts_join(cluster: EmbeddedServer) -> None:
    first = cluster.start()
    assert first.initialized and first.running and first.pid
    assert query(first.url())
    again = cluster.start()
    assert again.pid == first.pid
    with psycopg.connect(first.url()) as conn:
        assert conn.execute("SHOW shared_preload_libraries").fetchone() == ("pg_stat_statements",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)  # unix socket only


def test_server_is_detached_from_the_client_session(cluster: EmbeddedServer) -> None:
    status = cluster.start()
    assert os.getsid(status.pid) != os.getsid(0)  # Ctrl-C in the client's terminal never reaches it


def test_recovers_from_the_stale_pid_file_a_killed_server_leaves(cluster: EmbeddedServer) -> None:
    pid = cluster.start().pid
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not cluster.status().running:
            break
        time.sleep(0.05)
    status = cluster.status()
    assert not status.running and status.stale_pid_file
    assert (cluster.data_dir / "postmaster.pid").exists()
    restarted = cluster.start()
    assert restarted.running and restarted.pid != pid
    assert query(restarted.url())


def test_a_pid_file_naming_a_live_unrelated_process_is_stale(cluster: EmbeddedServer) -> None:
    cluster.start()
    assert cluster.stop() is True
    assert cluster.stop() is False
    pid_file = cluster.data_dir / "postmaster.pid"
    pid_file.write_text(f"{os.getpid()}\n{cluster.data_dir}\n0\n5432\n{cluster.data_dir}\n\n0 0\nready\n")
    status = cluster.status()
    assert not status.running and status.stale_pid_file
    assert query(cluster.start().url())


def test_concurrent_starts_share_one_server() -> None:
    data_dir = cluster_dir()
    code = (
        f"from dlq_assets.devtools.embedded import EmbeddedServer; print(EmbeddedServer({str(data_dir)!r}).start().pid)"
    )
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
        pids = {p.communicate(timeout=120)[0].strip() for p in procs}
        assert all(p.returncode == 0 for p in procs)
        assert len(pids) == 1 and pids != {""}
    finally:
        remove_cluster(data_dir)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


def test_sigterm_to_the_owner_stops_the_server_cleanly() -> None:
    data_dir = cluster_dir()
    code = textwrap.dedent(
        f"""
        import time
        from dlq_assets.devtools.embedded import owned_server
        with owned_server({str(data_dir)!r}) as server:
            print(server.status().pid, flush=True)
            time.sleep(120)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(owner.stdout.readline())
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(60) == 128 + signal.SIGTERM
        server = EmbeddedServer(data_dir)
        assert not server.status().running and not (data_dir / "postmaster.pid").exists()
        assert "database system is shut down" in server.log_file.read_text()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        owner.kill()
        remove_cluster(data_dir)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


def test_without_a_url_an_entry_point_uses_the_embedded_dlq_database(
    cluster: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(db.URL_ENV, raising=False)
    monkeypatch.setenv("DLQ_DATA_DIR", str(cluster.data_dir))
    url = resolve_url()
    assert url == cluster.status().url("dlq")
    with db.connect(url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("dlq",)
    monkeypatch.setenv(db.URL_ENV, db.EMBEDDED)
    assert resolve_url() == url


def test_without_a_url_the_library_refuses_with_one_line_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(db.URL_ENV, raising=False)
    for configured in (None, db.EMBEDDED):
        if configured:
            monkeypatch.setenv(db.URL_ENV, configured)
        with pytest.raises(db.DatabaseNotConfigured, match=db.URL_ENV) as raised:
            db.database_url()
        assert "\n" not in str(raised.value)


def test_a_url_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(db.URL_ENV, "postgresql+psycopg2://u:secret@db.example:5433/x")
    assert db.database_url() == "postgresql://u:secret@db.example:5433/x"
    assert db.redact(db.database_url()) == "postgresql://u:***@db.example:5433/x"
    assert db.sqlalchemy_url(db.database_url(), "psycopg2").startswith("postgresql+psycopg2://u:secret@")
    with pytest.raises(ValueError, match="not a PostgreSQL URL: mysql://u:\\*\\*\\*@h/x"):
        db.normalize_url("mysql://u:secret@h/x")


@pytest.mark.skipif(os.geteuid() != 0, reason="the whole suite already runs as this normal user")
def test_runs_as_a_normal_user_too() -> None:
    user = "dlq_test_user"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", user], check=True)
        entry = pwd.getpwnam(user)
    home = cluster_dir().parent
    os.chown(home, entry.pw_uid, entry.pw_gid)
    # The user must reach this interpreter, the project and the test dir (as the server user must, as root).
    for path in (home, Path(sys.executable).resolve(), Path(__file__).resolve()):
        for ancestor in path.parents:
            ancestor.chmod(ancestor.stat().st_mode | 0o005)
    code = textwrap.dedent(
        f"""
        import os, psycopg
        from dlq_assets.devtools.embedded import EmbeddedServer
        server = EmbeddedServer({str(home / "pgdata")!r})
        status = server.start()
        with psycopg.connect(status.url()) as conn:
            print(conn.execute("SELECT usename FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()[0])
        print(os.geteuid(), os.stat(status.data_dir).st_uid)
        server.stop()
        """
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code],
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=home,
            env={**os.environ, "HOME": str(home)},
        )
    finally:
        remove_cluster(home / "pgdata")
        shutil.rmtree(home, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["postgres", str(entry.pw_uid), str(entry.pw_uid)]


def test_a_data_dir_too_long_for_a_unix_socket_puts_the_socket_in_tmp() -> None:
    base = cluster_dir().parent
    data_dir = base / ("x" * 60) / ("y" * 60) / "pgdata"
    data_dir.parent.mkdir(parents=True)
    server = EmbeddedServer(data_dir)
    try:
        status = server.start()
        assert status.socket_dir is not None and status.socket_dir != server.data_dir
        assert len(str(status.socket_dir / ".s.PGSQL.5432")) < 100
        assert query(status.url())
    finally:
        remove_cluster(data_dir)
        shutil.rmtree(base, ignore_errors=True)
