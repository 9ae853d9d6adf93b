"""The two kinds of SQL: the baseline builds what the squashed chain built, and every function lives in one file.

The pre-baseline chain (0001-0021) is kept byte for byte in tests/fixtures/sql_chain: deployed databases hold its
checksums in their ledgers. The schema comparison runs on whichever server the suite uses (the embedded one, and
the 5432 service in CI's second pass).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from dlq_assets.core import migrations
from dlq_assets.core.migrations import SQUASHED_CHAIN, MigrationError, discover, discover_functions, migrate, sql_dir
from dlq_assets.devtools.embedded import _bin
from tests.conftest import TESTS_DIR, _create_database, _drop_database
from tests.reliability.conftest import VALID, insert_dead_letter

CHAIN = TESTS_DIR / "fixtures" / "sql_chain"
# A per-column option some servers (the 5432 service here) stamp on every column with a per-database value.
_SERVER_ATTRIBUTE_OPTION = re.compile(r"^ALTER TABLE ONLY \S+ ALTER COLUMN \S+ SET \(pg_attver=\d+\);$")
REFERENCE_TABLES = ("dlq_retry_policies", "dlq_cowrie_event_ids", "dlq_circuit_breaker_state", "dlq_event_counts")
_DEFINED = re.compile(r"^CREATE OR REPLACE (FUNCTION|VIEW|TRIGGER) (\w+)", re.M | re.I)
_ANY_CREATE = re.compile(r"^\s*CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|VIEW|TRIGGER|PROCEDURE)\b", re.M | re.I)


def chain_dir(tmp_path: Path) -> Path:
    """An SQL directory holding only the pre-baseline chain, as it was applied."""
    (tmp_path / "migrations").mkdir(parents=True)
    for path in CHAIN.glob("*.sql"):
        shutil.copyfile(path, tmp_path / "migrations" / path.name)
    return tmp_path


def schema_dump(url: str) -> str:
    """``pg_dump --schema-only``, without comments, blank lines, per-run \\restrict keys or server stamps."""
    out = subprocess.run(
        [str(_bin("pg_dump")), "--schema-only", "--no-owner", "--no-statistics", "-d", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    kept = (
        line for line in out.splitlines() if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict"))
    )
    return "\n".join(line for line in kept if not _SERVER_ATTRIBUTE_OPTION.search(line))


def reference_rows(url: str) -> dict[str, list[tuple]]:
    with psycopg.connect(url) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in REFERENCE_TABLES}


def test_the_fixture_is_the_chain_the_runner_accepts_in_the_baselines_place(tmp_path: Path) -> None:
    assert {m.version: (m.name, m.checksum) for m in discover(chain_dir(tmp_path))} == SQUASHED_CHAIN


def test_a_database_migrated_through_the_old_chain_and_a_fresh_one_have_the_same_schema(
    server_url: str, empty_db_url: str, tmp_path: Path
) -> None:
    name = f"dlq_chain_{uuid.uuid4().hex[:12]}"
    upgraded = _create_database(server_url, name)
    try:
        assert [m.version for m in migrate(upgraded, directory=chain_dir(tmp_path))] == sorted(SQUASHED_CHAIN)
        pending = [m.version for m in discover() if m.version > migrations.BASELINE_VERSION]
        assert [m.version for m in migrate(upgraded)] == pending  # the chain stands for the baseline
        fresh = [m.version for m in migrate(empty_db_url)]
        assert fresh == [migrations.BASELINE_VERSION, *pending]
        assert schema_dump(upgraded) == schema_dump(empty_db_url)
        assert reference_rows(upgraded) == reference_rows(empty_db_url)
        assert migrate(upgraded) == [] and migrate(empty_db_url) == []
    finally:
        _drop_database(server_url, name)


def test_every_function_view_and_trigger_is_defined_once_and_only_in_sql_functions(db_url: str) -> None:
    defined: dict[tuple[str, str], list[str]] = {}
    for file in discover_functions():
        for kind, name in _DEFINED.findall(file.sql):
            defined.setdefault((kind.upper(), name), []).append(file.name)
        assert len(_DEFINED.findall(file.sql)) == len(_ANY_CREATE.findall(file.sql)), (
            f"{file.name}: CREATE without OR REPLACE"
        )
    assert {k: v for k, v in defined.items() if len(v) > 1} == {}
    for migration in discover():
        if migration.version >= migrations.BASELINE_VERSION:
            assert not _ANY_CREATE.search(migration.sql), f"{migration.name} defines a function, view or trigger"
    with psycopg.connect(db_url) as conn:
        in_database = {
            ("FUNCTION", r[0])
            for r in conn.execute("SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")
        }
        in_database |= {
            ("VIEW", r[0]) for r in conn.execute("SELECT viewname FROM pg_views WHERE schemaname = 'public'")
        }
        in_database |= {
            ("TRIGGER", r[0])
            for r in conn.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgparentid = 0")
        }
    assert set(defined) == in_database


def function(directory: Path, file: str, name: str, body: str) -> None:
    (directory / "functions" / f"{file}.sql").write_text(
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS int LANGUAGE sql AS $$ {body} $$;", encoding="utf-8"
    )


def test_a_changed_function_file_is_applied_again_and_the_others_are_not(empty_db_url: str, tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "functions").mkdir()
    (tmp_path / "migrations" / "0001_t.sql").write_text("CREATE TABLE t (n int); INSERT INTO t VALUES (1);")
    function(tmp_path, "10_a", "a", "SELECT 1")
    function(tmp_path, "20_b", "b", "SELECT a() + (SELECT n FROM t)")

    def state() -> tuple[int, dict[str, object]]:
        with psycopg.connect(empty_db_url) as conn:
            value = conn.execute("SELECT b()").fetchone()[0]
            return value, dict(conn.execute("SELECT name, applied_at FROM dlq_schema_functions").fetchall())

    migrate(empty_db_url, directory=tmp_path)
    value, first = state()
    assert value == 2 and set(first) == {"10_a", "20_b"}
    migrate(empty_db_url, directory=tmp_path)
    assert state()[1] == first  # unchanged files are not applied again
    function(tmp_path, "10_a", "a", "SELECT 40")
    migrate(empty_db_url, directory=tmp_path)
    value, second = state()
    assert value == 41 and second["20_b"] == first["20_b"] and second["10_a"] != first["10_a"]


def test_a_failing_function_file_applies_none_of_that_run(empty_db_url: str, tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "functions").mkdir()
    (tmp_path / "migrations" / "0001_t.sql").write_text("CREATE TABLE t (n int);")
    function(tmp_path, "10_a", "a", "SELECT 1")
    function(tmp_path, "20_b", "b", "SELECT nope")
    with pytest.raises(MigrationError, match="function file 20_b failed"):
        migrate(empty_db_url, directory=tmp_path)
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regprocedure('a()')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM dlq_schema_migrations").fetchone() == (1,)  # the migration stays
        assert conn.execute("SELECT count(*) FROM dlq_schema_functions").fetchone() == (0,)


def test_a_database_with_part_of_the_old_chain_is_refused_then_finishes_the_chain_and_upgrades(
    empty_db_url: str, tmp_path: Path
) -> None:
    partial = chain_dir(tmp_path / "partial")
    for path in sorted((partial / "migrations").glob("*.sql"))[15:]:
        path.unlink()
    migrate(empty_db_url, directory=partial)
    with pytest.raises(
        MigrationError, match=r"part of the pre-baseline chain \(missing versions \[16, 17, 18, 19, 20, 21\]\)"
    ):
        migrate(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT max(version) FROM dlq_schema_migrations").fetchone() == (15,)
    assert [m.version for m in migrate(empty_db_url, directory=chain_dir(tmp_path / "whole"))] == list(range(16, 22))
    assert [m.version for m in migrate(empty_db_url)] == [v.version for v in discover() if v.version > 21]


def test_the_sql_directory_is_found_beside_the_package_or_in_it() -> None:
    assert (sql_dir() / "migrations").is_dir() and (sql_dir() / "functions").is_dir()


def test_a_run_stopped_after_a_migration_still_applies_every_function_file_next_time(
    empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "functions").mkdir()
    (tmp_path / "migrations" / "0001_t.sql").write_text("CREATE TABLE t (n int);")
    function(tmp_path, "10_a", "a", "SELECT 1")
    migrate(empty_db_url, directory=tmp_path)
    (tmp_path / "migrations" / "0002_drop.sql").write_text("DROP FUNCTION a();")  # the file of a() is unchanged

    def stopped(*args: object) -> None:
        raise MigrationError("stopped before the function files")

    monkeypatch.setattr(migrations, "_apply_functions", stopped)
    with pytest.raises(MigrationError, match="stopped"):
        migrate(empty_db_url, directory=tmp_path)
    monkeypatch.undo()
    run = migrations.run_migrations(empty_db_url, directory=tmp_path)
    assert run.migrations == [] and [f.name for f in run.functions] == ["10_a"]
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT a()").fetchone() == (1,)


def test_an_object_dropped_by_hand_is_brought_back(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP VIEW dlq_health")
        conn.execute("DROP FUNCTION dlq_claim_batch")
    run = migrations.run_migrations(db_url)
    assert run.restored == ["function dlq_claim_batch", "view dlq_health"]
    assert len(run.functions) == len(discover_functions())
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM dlq_health").fetchone() == (1,)
        assert conn.execute("SELECT to_regprocedure('dlq_claim_batch(uuid, integer, integer, text)')").fetchone()[0]
    assert migrations.run_migrations(db_url) == migrations.MigrationRun([], [], [])


@pytest.mark.parametrize("ledger", ["dlq_schema_migrations", "dlq_schema_functions"])
def test_a_foreign_table_named_like_a_ledger_is_refused_before_anything_is_applied(
    empty_db_url: str, ledger: str
) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {ledger} (id serial PRIMARY KEY, filename text)")
    with pytest.raises(MigrationError, match=rf"public\.{ledger} exists but is not the schema ledger"):
        migrate(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert tables == (1,)  # only the foreign table: nothing applied, no ledger created


def test_the_schema_goes_to_public_whatever_schema_the_role_name_has(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        user = conn.execute("SELECT current_user").fetchone()[0]
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(user)))
    migrate(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regclass('public.dead_letter_events')").fetchone()[0] is not None
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_user").fetchone() == (0,)


def test_an_up_to_date_database_needs_no_create_right(db_url: str) -> None:
    role = f"dlq_ro_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} NOLOGIN IN ROLE dlq_reader")
        conn.execute(f"GRANT SELECT ON dlq_schema_migrations, dlq_schema_functions TO {role}")
    try:
        as_reader = f"{db_url}{'&' if '?' in db_url else '?'}options=-c%20role%3D{role}"
        assert migrations.run_migrations(as_reader) == migrations.MigrationRun([], [], [])
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_a_ledger_that_names_another_file_is_refused(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE dlq_schema_migrations SET name = '0022_my_extra' WHERE version = 22")
    with pytest.raises(MigrationError, match="version 22 is recorded as 0022_my_extra, but this code's file is 0022_"):
        migrate(db_url)


def test_a_chain_with_another_file_in_it_says_which(empty_db_url: str, tmp_path: Path) -> None:
    chain = chain_dir(tmp_path)
    last = chain / "migrations" / "0021_hardening.sql"
    last.write_text(last.read_text() + "\n-- a local edit\n")
    migrate(empty_db_url, directory=chain)
    with pytest.raises(MigrationError, match=r"version 21 is recorded as 0021_hardening \(\w+\), not as the pre-base"):
        migrate(empty_db_url)


def test_a_disabled_trigger_comes_back_enabled_and_a_missing_counter_is_recounted(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE dead_letter_events DISABLE TRIGGER dead_letter_events_before_update")
        conn.execute("DROP TRIGGER dead_letter_events_count_insert ON dead_letter_events")
        insert_dead_letter(conn, VALID)  # not counted while the trigger is gone
    run = migrations.run_migrations(db_url)
    assert run.restored == ["trigger dead_letter_events_before_update", "trigger dead_letter_events_count_insert"]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT total_events FROM dlq_health").fetchone() == (1,)
        enabled = (
            "SELECT tgenabled FROM pg_trigger WHERE tgname = 'dead_letter_events_before_update' AND tgparentid = 0"
        )
        assert conn.execute(enabled).fetchone() == ("O",)


def test_a_view_named_like_a_ledger_is_refused(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE VIEW dlq_schema_functions AS SELECT ''::text AS name, ''::char(64) AS checksum, "
            "now() AS applied_at, 0 AS duration_ms"
        )
    with pytest.raises(MigrationError, match=r"public\.dlq_schema_functions exists but is not a table"):
        migrate(empty_db_url)


def test_a_function_file_failing_after_a_migration_says_what_was_committed(db_url: str, tmp_path: Path) -> None:
    shutil.copytree(sql_dir(), tmp_path / "sql")
    (tmp_path / "sql" / "migrations" / "0099_extra.sql").write_text("CREATE TABLE extra (n int);")
    (tmp_path / "sql" / "functions" / "90_health.sql").write_text("CREATE OR REPLACE VIEW broken AS SELECT nope;")
    committed = r"(?s)function file 90_health failed: .* \(committed before it: 0099_extra;"
    with pytest.raises(MigrationError, match=committed):
        migrate(db_url, directory=tmp_path / "sql")
