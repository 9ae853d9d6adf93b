"""Versioned SQL migrations from ``sql/``: applied in order, each once, recorded with its checksum.

Guarantees (each covered by a test): concurrent runners serialise on an advisory lock; a migration file that
changed after it was applied is an error, never a silent re-run; a failing migration rolls back whole and
does not advance the recorded version.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from dlq_assets.core.db import database_url

MIGRATION_LOCK_KEY = 0x646C7131  # "dlq1": the advisory lock every migration runner takes
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LEDGER = """
CREATE TABLE IF NOT EXISTS dlq_schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    char(64) NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms integer NOT NULL
)
"""


class MigrationError(RuntimeError):
    """A migration could not be applied; the database keeps the last good version."""


class ChangedMigrationError(MigrationError):
    """An applied migration's file no longer matches the checksum recorded when it was applied."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str = field(repr=False)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def migrations_dir() -> Path:
    """``$DLQ_SQL_DIR``, else the ``sql/`` beside the package (a checkout or an editable install)."""
    configured = os.environ.get("DLQ_SQL_DIR")
    candidates = [Path(configured)] if configured else []
    candidates.append(Path(__file__).resolve().parents[2] / "sql")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise MigrationError(f"no migrations directory found (looked in {', '.join(map(str, candidates))})")


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations share version {version}: {found[version].name}, {path.name}")
        found[version] = Migration(version, path.stem, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def applied_versions(conn: psycopg.Connection[Any]) -> dict[int, tuple[str, str]]:
    """version -> (name, checksum) of what the database has applied; empty before the first migration."""
    if conn.execute("SELECT to_regclass('dlq_schema_migrations')").fetchone() == (None,):
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM dlq_schema_migrations ORDER BY version").fetchall()
    return {version: (name, checksum) for version, name, checksum in rows}


def _pending(conn: psycopg.Connection[Any], migrations: list[Migration]) -> list[Migration]:
    applied = applied_versions(conn)
    known = {m.version for m in migrations}
    if unknown := sorted(set(applied) - known):
        raise MigrationError(f"the database has migrations this code does not know: {unknown}")
    for migration in migrations:
        if migration.version in applied and applied[migration.version][1] != migration.checksum:
            raise ChangedMigrationError(
                f"migration {migration.name} changed after it was applied "
                f"(recorded {applied[migration.version][1][:12]}, file {migration.checksum[:12]}); "
                "add a new migration instead of editing an applied one"
            )
    return [m for m in migrations if m.version not in applied]


def _apply(conn: psycopg.Connection[Any], migration: Migration) -> None:
    started = time.perf_counter()
    try:
        conn.execute(migration.sql.encode("utf-8"))  # bytes: run as a script, several statements
    except psycopg.Error as exc:
        raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
    conn.execute(
        "INSERT INTO dlq_schema_migrations (version, name, checksum, duration_ms) VALUES (%s, %s, %s, %s)",
        (
            migration.version,
            migration.name,
            migration.checksum,
            round((time.perf_counter() - started) * 1000),
        ),
    )


def apply_in_transaction(conn: psycopg.Connection[Any], migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply pending migrations inside the caller's open transaction; the caller commits or rolls back."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
    conn.execute(_LEDGER)
    pending = _pending(conn, discover() if migrations is None else migrations)
    for migration in pending:
        _apply(conn, migration)
    return pending


def migrate(url: str | None = None, *, directory: Path | None = None) -> list[Migration]:
    """Bring the database up to date, one transaction per migration; returns what was applied."""
    migrations = discover(directory)
    with psycopg.connect(database_url(url), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(_LEDGER)
            pending = _pending(conn, migrations)
            for migration in pending:
                with conn.transaction():
                    _apply(conn, migration)
            return pending
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def current_version(conn: psycopg.Connection[Any]) -> int:
    return max(applied_versions(conn), default=0)
