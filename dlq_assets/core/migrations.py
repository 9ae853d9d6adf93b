"""The schema from ``sql/``: numbered migrations, then the functions, under one advisory lock.

- ``sql/migrations/NNNN_name.sql`` hold tables, indexes, roles, grants and data. Each is applied once, in
  order, in a transaction of its own, and recorded with its checksum; an applied file that changed is an error,
  never a silent re-run, and a failing one rolls back whole without advancing the recorded version.
- ``sql/functions/NN_concern.sql`` hold every function, view and trigger, each defined once with
  ``CREATE OR REPLACE``. After the migrations, the files whose checksum differs from the one recorded are
  applied in file order, together in one transaction (Flyway's repeatable migrations). Applying a migration
  forgets their checksums in its own transaction, so all of them follow it (what a migration dropped comes back
  with its grants, even when the run stops in between); so does an object missing from the database. Changing a
  function is editing its file; dropping one, or changing its return type, takes a migration that drops it.
- ``0021_baseline`` is the schema the pre-baseline chain (0001-0021) built. A database that applied that chain
  keeps its ledger rows: those files count as the baseline, provided all of them are there unchanged.

Concurrent runners serialise on the advisory lock, so each file is applied by one of them.
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
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_FUNCTIONS_NAME = re.compile(r"^(\d{2})_([a-z0-9_]+)\.sql$")
_LEDGER = """
CREATE TABLE IF NOT EXISTS dlq_schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    char(64) NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms integer NOT NULL
)
"""
_FUNCTIONS_LEDGER = """
CREATE TABLE IF NOT EXISTS dlq_schema_functions (
    name        text PRIMARY KEY,
    checksum    char(64) NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms integer NOT NULL
)
"""
BASELINE_VERSION = 21
# The pre-baseline chain, as its files were applied: version -> (name, sha256). A database whose ledger holds
# exactly these has the baseline's schema (tests/core/test_schema_baseline.py proves it with pg_dump).
SQUASHED_CHAIN: dict[int, tuple[str, str]] = {
    1: ("0001_core_schema", "6e4ba0cdd4895cfe11723a40336b3b126d7486d28622d663d7a3f021252adc48"),
    2: ("0002_roles_and_rls", "7217db28bd7dbdedb64a0e08c788543e8a508feeed86baebd853b77ba9fd46de"),
    3: ("0003_state_machine", "6431b172e6cafd74fa8eaec43bfc4a47fefac20158f1282b4efb3836395b694b"),
    4: ("0004_circuit_breaker", "73df8d200c54e63234230b0525109b5dbe6f845520572a57ec6587ab1d412e7e"),
    5: ("0005_retention", "58835ab7aa6e6c2b9100e47260cbbc50651f986d7bdbd6c80851099870052b49"),
    6: ("0006_claim_neighbours", "b7ef96d527b4d1cfd91add13ed59298c1a49efce56df95586f5df751f9129e8b"),
    7: ("0007_process_in_database", "04c954d9e7d1556dce138310ccddfee206bbfba9898b753c47ea69083a7fb9cc"),
    8: ("0008_redrive", "2ecb2429fceb004cab0ad0a4ad49833c27afd358e45869271b37ff46d3c4d4fe"),
    9: ("0009_faster_batches", "d5509728b6e68a4ead88c837b2d95d8c4ed3d3b73ec9299a07f4f970149e2acb"),
    10: ("0010_revoke_leases_on_malicious", "d877fc3be2cd6bc6f63fc8c82f35fa1e302c0b57a463f58ebe2640e557fb4b56"),
    11: ("0011_transaction_leases", "d0d9bf41516fc3373875ae4ab5f7cd1c976b4170e5dbf6ebd0cd6e288a3a5782"),
    12: ("0012_health_counters", "da223da730c8f31cfbb68b5225d24c6b6334f4bcc078608399bc56277e9e0ede"),
    13: ("0013_cheaper_completion", "8417cc0909e1702a6a0235fec8954a3c2417b3840a76ad68cd54b18149bb7045"),
    14: ("0014_checksum_check_without_regex", "91a733878bc23e9af65067e3d485d26ff2e1d5fb860910a87c3f017cbb506548"),
    15: ("0015_partial_source_index", "b769dcfd28fe289511c4a4abfcfad59e5c8055c27ebb86fb8fd946e10f2fe610"),
    16: ("0016_inlinable_payload_checksum", "a0985f4af8a7dbcfb52ce6b87ffdc303ed3b5b1b56fccda808413bf0c7fe4e48"),
    17: ("0017_counts_skip_empty_statements", "0eac0009a4a8f618f4b11c3e57e8289fd880236fce3df5197434cf9967115552"),
    18: ("0018_completion_in_one_update", "a73dd15643bf0029a621f6efd921a5e66aaddbb8496cbba66acde045acb89ae2"),
    19: ("0019_journal_ids_uncompressed", "db695414c10b0632bbe14ce5d53061068beeee35227a9bde56d9c5e1b6fe6c92"),
    20: ("0020_partial_raw_events", "89a92cdb94d14b7c370cc8458f2a3ba4e38b04491dfd0fb6df65ef75c5320fe1"),
    21: ("0021_hardening", "20e7901189bc5f2ee0ef1a63cce5fb1ee110c28becc11e8a4297a0bcca06b88d"),
}


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


@dataclass(frozen=True)
class FunctionsFile:
    name: str
    sql: str = field(repr=False)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def sql_dir() -> Path:
    """``$DLQ_SQL_DIR``, else the ``sql/`` a wheel ships inside the package, else the checkout's ``sql/``."""
    configured = os.environ.get("DLQ_SQL_DIR")
    package = Path(__file__).resolve().parents[1]
    candidates = [Path(configured)] if configured else [package / "sql", package.parent / "sql"]
    for candidate in candidates:
        if (candidate / "migrations").is_dir():
            return candidate
    raise MigrationError(f"no SQL directory with migrations/ found (looked in {', '.join(map(str, candidates))})")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MigrationError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def discover(directory: Path | None = None) -> list[Migration]:
    """The numbered migrations under ``directory/migrations`` (default :func:`sql_dir`), in version order."""
    found: dict[int, Migration] = {}
    for path in sorted(((directory or sql_dir()) / "migrations").glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations share version {version}: {found[version].name}, {path.name}")
        found[version] = Migration(version, path.stem, _read(path))
    return [found[v] for v in sorted(found)]


def discover_functions(directory: Path | None = None) -> list[FunctionsFile]:
    """The function files under ``directory/functions``, in the order they are applied (their name's number)."""
    files = []
    for path in sorted(((directory or sql_dir()) / "functions").glob("*.sql")):
        if not _FUNCTIONS_NAME.match(path.name):
            raise MigrationError(f"{path.name}: function files are named NN_concern.sql")
        files.append(FunctionsFile(path.stem, _read(path)))
    return files


def applied_versions(conn: psycopg.Connection[Any]) -> dict[int, tuple[str, str]]:
    """version -> (name, checksum) of what the database has applied; empty before the first migration."""
    if conn.execute("SELECT to_regclass('public.dlq_schema_migrations')").fetchone() == (None,):
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM public.dlq_schema_migrations ORDER BY version").fetchall()
    return {version: (name, checksum) for version, name, checksum in rows}


def _squashed_chain_applied(applied: dict[int, tuple[str, str]]) -> bool:
    """True when the ledger holds the pre-baseline chain; an error when it holds only part of it, or other files."""
    recorded = {v: row for v, row in applied.items() if v in SQUASHED_CHAIN}
    if not recorded or not any(row == SQUASHED_CHAIN[v] for v, row in recorded.items()):
        return False
    if other := sorted(v for v, row in recorded.items() if row != SQUASHED_CHAIN[v]):
        v = other[0]
        raise MigrationError(
            f"version {v} is recorded as {applied[v][0]} ({applied[v][1][:12]}), not as the pre-baseline chain's "
            f"{SQUASHED_CHAIN[v][0]} ({SQUASHED_CHAIN[v][1][:12]}): this database's history is not one this code knows"
        )
    if missing := sorted(set(SQUASHED_CHAIN) - set(recorded)):
        raise MigrationError(
            f"the database applied part of the pre-baseline chain (missing versions {missing}); "
            "it needs all of 0001-0021 before the baseline can take their place: apply the rest first with "
            "DLQ_SQL_DIR=<a folder whose migrations/ holds the whole chain, the source's tests/fixtures/sql_chain> "
            "dlq create"
        )
    return True


def _pending(conn: psycopg.Connection[Any], migrations: list[Migration]) -> list[Migration]:
    applied = applied_versions(conn)
    known = {m.version for m in migrations}
    baseline = next((m for m in migrations if m.version == BASELINE_VERSION), None)
    is_chain = baseline is not None and (baseline.name, baseline.checksum) == SQUASHED_CHAIN[BASELINE_VERSION]
    if baseline is not None and not is_chain and _squashed_chain_applied(applied):  # the chain stands for it
        applied = {v: row for v, row in applied.items() if v not in SQUASHED_CHAIN}
        applied[BASELINE_VERSION] = (baseline.name, baseline.checksum)
    if unknown := sorted(set(applied) - known):
        raise MigrationError(f"the database has migrations this code does not know: {unknown}")
    for migration in migrations:
        if migration.version not in applied:
            continue
        name, checksum = applied[migration.version]
        if name != migration.name:
            raise MigrationError(
                f"version {migration.version} is recorded as {name}, but this code's file is {migration.name}"
            )
        if checksum != migration.checksum:
            raise ChangedMigrationError(
                f"migration {migration.name} changed after it was applied "
                f"(recorded {checksum[:12]}, file {migration.checksum[:12]}); "
                "add a new migration instead of editing an applied one"
            )
    return [m for m in migrations if m.version not in applied]


def _ensure_ledgers(conn: psycopg.Connection[Any]) -> None:
    """Refuse a table named like a ledger that is something else, then create the ledgers that are missing (an
    up-to-date database needs no CREATE right): all before anything is applied."""
    ledgers = (
        ("dlq_schema_migrations", _LEDGER, {"version", "name", "checksum", "applied_at", "duration_ms"}),
        ("dlq_schema_functions", _FUNCTIONS_LEDGER, {"name", "checksum", "applied_at", "duration_ms"}),
    )
    missing_tables = []
    for table, ddl, columns in ledgers:
        kind, found = conn.execute(
            "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%(t)s)), "
            "(SELECT array_agg(attname::text) FROM pg_attribute WHERE attrelid = to_regclass(%(t)s) AND attnum > 0 "
            "AND NOT attisdropped)",
            {"t": f"public.{table}"},
        ).fetchone()  # type: ignore[misc]  # a SELECT without FROM: always one row
        if kind is None:
            missing_tables.append(ddl)
        elif kind != "r":
            raise MigrationError(f"public.{table} exists but is not a table of this database (relkind {kind})")
        elif lacking := sorted(columns - set(found or ())):
            raise MigrationError(
                f"public.{table} exists but is not the schema ledger (no column {', '.join(lacking)}): "
                "rename it, or use another database"
            )
    for ddl in missing_tables:
        conn.execute(ddl)


def _run(conn: psycopg.Connection[Any], what: str, text: str) -> int:
    """Run one file as a script; its duration in ms. A failure names the file."""
    started = time.perf_counter()
    try:
        conn.execute(text.encode("utf-8"))  # bytes: run as a script, several statements
    except psycopg.Error as exc:
        raise MigrationError(f"{what} failed: {exc}") from exc
    return round((time.perf_counter() - started) * 1000)


def _apply(conn: psycopg.Connection[Any], migration: Migration) -> None:
    """Apply and record one migration; in the same transaction, forget what the function files recorded, so that
    all of them are applied after it (a migration may drop a function, a view or a grant), even by a later run
    when this one stops before its functions."""
    duration = _run(conn, f"migration {migration.name}", migration.sql)
    conn.execute(
        "INSERT INTO dlq_schema_migrations (version, name, checksum, duration_ms) VALUES (%s, %s, %s, %s)",
        (migration.version, migration.name, migration.checksum, duration),
    )
    conn.execute("DELETE FROM dlq_schema_functions")


_DEFINED = re.compile(r"^CREATE OR REPLACE (FUNCTION|VIEW|TRIGGER) (\w+)", re.M | re.I)
_IN_CATALOG = """
SELECT 'FUNCTION', proname::text FROM pg_proc WHERE pronamespace = 'public'::regnamespace
UNION ALL SELECT 'VIEW', viewname::text FROM pg_views WHERE schemaname = 'public'
UNION ALL SELECT 'TRIGGER', t.tgname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
           WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND c.relnamespace = 'public'::regnamespace
             AND t.tgenabled <> 'D'  -- a disabled trigger counts as missing: re-creating it enables it
"""


def _missing_objects(conn: psycopg.Connection[Any], defined: set[tuple[str, str]]) -> list[str]:
    """Of the (kind, name) the files define, the functions, views and (enabled) triggers the database lacks
    (dropped or disabled by hand, say): matched by name."""
    present = set(conn.execute(_IN_CATALOG).fetchall())
    return sorted(f"{kind.lower()} {name}" for kind, name in defined - present)


@dataclass(frozen=True)
class MigrationRun:
    migrations: list[Migration]  # the numbered migrations applied, in order
    functions: list[FunctionsFile]  # the function files applied
    restored: list[str] = field(default_factory=list)  # objects that were missing, which the files brought back


def _apply_functions(
    conn: psycopg.Connection[Any], files: list[FunctionsFile]
) -> tuple[list[FunctionsFile], list[str]]:
    """Apply the function files whose checksum differs from the one recorded, in order; all of them when an
    object one defines is missing from the database."""
    if not files:
        return [], []
    recorded = dict(conn.execute("SELECT name, checksum FROM dlq_schema_functions").fetchall())
    defined = {(kind.upper(), name) for f in files for kind, name in _DEFINED.findall(f.sql)}
    missing = _missing_objects(conn, defined)
    restored = missing if len(missing) < len(defined) else []  # all of them missing: a new database
    changed = [f for f in files if missing or recorded.get(f.name) != f.checksum]
    for file in changed:
        duration = _run(conn, f"function file {file.name}", file.sql)
        conn.execute(
            "INSERT INTO dlq_schema_functions (name, checksum, duration_ms) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now(), "
            "duration_ms = EXCLUDED.duration_ms",
            (file.name, file.checksum, duration),
        )
    return changed, restored


def apply_in_transaction(conn: psycopg.Connection[Any], migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply pending migrations, then changed functions, inside the caller's open transaction; the caller
    commits or rolls back."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
    conn.execute("SET LOCAL search_path = public")  # the schema's home, whatever schema the role's name has
    _ensure_ledgers(conn)
    pending = _pending(conn, discover() if migrations is None else migrations)
    for migration in pending:
        _apply(conn, migration)
    _apply_functions(conn, discover_functions() if migrations is None else [])
    return pending


def run_migrations(url: str | None = None, *, directory: Path | None = None) -> MigrationRun:
    """Bring the database up to date: each pending migration in its transaction, then the function files that
    changed (or all of them, after a migration or when an object is missing) in one."""
    migrations = discover(directory)
    functions = discover_functions(directory)
    with psycopg.connect(database_url(url), autocommit=True) as conn:
        conn.execute("SET search_path = public")  # the schema's home, whatever schema the role's name has
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            _ensure_ledgers(conn)
            pending = _pending(conn, migrations)
            for migration in pending:
                with conn.transaction():
                    _apply(conn, migration)
            try:
                with conn.transaction():
                    applied, restored = _apply_functions(conn, functions)
            except MigrationError as exc:
                if not pending:
                    raise
                done = ", ".join(m.name for m in pending)
                raise MigrationError(
                    f"{exc} (committed before it: {done}; the function files are not: fix the file and run "
                    "`dlq create` again)"
                ) from exc
            return MigrationRun(pending, applied, restored)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def migrate(url: str | None = None, *, directory: Path | None = None) -> list[Migration]:
    """:func:`run_migrations`, returning the numbered migrations it applied."""
    return run_migrations(url, directory=directory).migrations


def current_version(conn: psycopg.Connection[Any]) -> int:
    return max(applied_versions(conn), default=0)
