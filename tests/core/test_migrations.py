"""The migration runner's promises: order, once each, checksums, advisory lock, all-or-nothing failures."""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

import psycopg
import pytest

from dlq_assets.core import migrations
from dlq_assets.core.db import with_database
from dlq_assets.core.migrations import ChangedMigrationError, MigrationError, discover, migrate


def write(directory: Path, name: str, body: str) -> None:
    """A migration file under ``directory/migrations`` (the layout migrate(directory=...) reads)."""
    (directory / "migrations").mkdir(exist_ok=True)
    (directory / "migrations" / name).write_text(body, encoding="utf-8")


def recorded(url: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version, name, checksum FROM dlq_schema_migrations ORDER BY version").fetchall()


def test_project_migrations_apply_in_order_once_with_checksums(empty_db_url: str) -> None:
    applied = migrate(empty_db_url)
    files = discover()
    assert [m.version for m in applied] == [m.version for m in files] == sorted(m.version for m in files)
    assert recorded(empty_db_url) == [(m.version, m.name, m.checksum) for m in files]
    assert migrate(empty_db_url) == []  # each once
    with psycopg.connect(empty_db_url) as conn:
        assert migrations.current_version(conn) == files[-1].version


def test_a_changed_applied_migration_is_an_error(empty_db_url: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_one.sql", "CREATE TABLE one (id int);")
    migrate(empty_db_url, directory=tmp_path)
    write(tmp_path, "0001_one.sql", "CREATE TABLE one (id bigint);")
    with pytest.raises(ChangedMigrationError, match="0001_one changed after it was applied"):
        migrate(empty_db_url, directory=tmp_path)


def test_a_failing_migration_rolls_back_whole_and_keeps_the_version(empty_db_url: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_one.sql", "CREATE TABLE one (id int);")
    write(tmp_path, "0002_two.sql", "CREATE TABLE two (id int);\nINSERT INTO two VALUES (1);\nSELECT 1/0;")
    with pytest.raises(MigrationError, match="0002_two failed: division by zero"):
        migrate(empty_db_url, directory=tmp_path)
    assert [r[0] for r in recorded(empty_db_url)] == [1]
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regclass('one'), to_regclass('two')").fetchone() == ("one", None)
    write(tmp_path, "0002_two.sql", "CREATE TABLE two (id int);")  # fixed before it was ever applied
    assert [m.version for m in migrate(empty_db_url, directory=tmp_path)] == [2]


def test_concurrent_runners_apply_each_migration_once(empty_db_url: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_slow.sql", "SELECT pg_sleep(0.5); CREATE TABLE slow (id int);")
    write(tmp_path, "0002_counter.sql", "CREATE TABLE counter (id int); INSERT INTO counter VALUES (1);")
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append([m.version for m in migrate(empty_db_url, directory=tmp_path)])
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(results) == [[], [], [], [1, 2]]
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM counter").fetchone() == (1,)


def test_unknown_applied_versions_and_bad_file_names_are_errors(empty_db_url: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_one.sql", "SELECT 1;")
    write(tmp_path, "0002_two.sql", "SELECT 2;")
    migrate(empty_db_url, directory=tmp_path)
    (tmp_path / "migrations" / "0002_two.sql").unlink()
    with pytest.raises(MigrationError, match="does not know: \\[2\\]"):
        migrate(empty_db_url, directory=tmp_path)
    write(tmp_path, "3_bad.sql", "SELECT 3;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        discover(tmp_path)


def test_apply_in_transaction_leaves_the_commit_to_the_caller(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url) as conn:
        applied = migrations.apply_in_transaction(conn)
        assert applied
        conn.rollback()
        assert migrations.applied_versions(conn) == {}
        migrations.apply_in_transaction(conn)
        conn.commit()
    assert len(recorded(empty_db_url)) == len(discover())


def test_the_generated_checksum_keeps_every_stored_event_and_derives_its_checksum(
    empty_db_url: str, tmp_path: Path
) -> None:
    """A database holding events written with their checksum sent by the writer, upgraded: every row stays, and its
    checksum is the table's, equal to dlq_payload_checksum (and to what the writer had sent)."""
    source = migrations.sql_dir()
    generated = next(m for m in discover() if m.name == "0025_raw_events_checksum_generated")
    (tmp_path / "migrations").mkdir()
    for m in discover():
        if m.version < generated.version:
            (tmp_path / "migrations" / f"{m.name}.sql").write_text(m.sql, encoding="utf-8")
    shutil.copytree(source / "functions", tmp_path / "functions")
    migrate(empty_db_url, directory=tmp_path)
    payloads = ['{"b": "caf\\u00e9 \\\\ \\"x\\"", "a": [1.50, 1e2, -0]}', '{"k": "日本 \\n\\t"}', "{}"]
    with psycopg.connect(empty_db_url) as conn:
        for offset, text in enumerate(payloads):
            conn.execute(
                "INSERT INTO raw_events (source, source_inode, source_offset, eventid, payload, payload_checksum) "
                "VALUES ('up', '1', %s, 'x', %s::jsonb, dlq_payload_checksum(%s::jsonb))",
                (offset, text, text),
            )
        before = conn.execute("SELECT source_offset, payload, payload_checksum FROM raw_events ORDER BY 1").fetchall()
    (tmp_path / "migrations" / f"{generated.name}.sql").write_text(generated.sql, encoding="utf-8")
    assert [m.version for m in migrate(empty_db_url, directory=tmp_path)] == [generated.version]
    with psycopg.connect(empty_db_url) as conn:
        after = conn.execute("SELECT source_offset, payload, payload_checksum FROM raw_events ORDER BY 1").fetchall()
        assert conn.execute(
            "SELECT count(*) FROM raw_events WHERE payload_checksum = dlq_payload_checksum(payload)"
        ).fetchone() == (3,)
        with pytest.raises(psycopg.errors.GeneratedAlways):
            conn.execute(
                "INSERT INTO raw_events (source, source_inode, source_offset, eventid, payload, payload_checksum) "
                "VALUES ('up', '1', 9, 'x', '{}', repeat('0', 64))"
            )
    assert after == before


def test_a_database_not_in_utf8_is_refused_by_name(server_url: str) -> None:
    """The generated checksum takes the payload text's bytes: in another encoding they are not its UTF-8."""
    name = f"dlq_latin1_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        with pytest.raises(MigrationError, match="the DLQ needs a UTF8 database; this one is LATIN1"):
            migrate(with_database(server_url, name))
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_a_malicious_classification_spelt_otherwise_is_hidden_on_upgrade_and_refused_after(
    empty_db_url: str, tmp_path: Path
) -> None:
    """'Malicious' escapes every exclusion written for 'malicious' (claims, row security): the upgrade hides such
    rows under the exact spelling, and the tables refuse any other after it."""
    before = tmp_path / "sql"
    shutil.copytree(migrations.sql_dir(), before)
    (before / "migrations" / "0027_classification_spelt_exactly.sql").unlink()
    migrate(empty_db_url, directory=before)
    spellings = ["Malicious", " malicious\n", "MALICIOUS", "malicious\x0b", "\u00a0malicious", "mali\u00adcious",
                 "malicious\u200b", "\ufeffmalicious\u3000", "maliciousness", "malicious", None]  # fmt: skip
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        for n, spelling in enumerate(spellings):
            conn.execute(
                "INSERT INTO dead_letter_events (reason, payload, classification) VALUES ('x', %s, %s)",
                (f'{{"n": {n}}}', spelling),
            )
        migrate(empty_db_url)
        stored = conn.execute("SELECT classification FROM dead_letter_events ORDER BY id").fetchall()
        assert [c for (c,) in stored] == ["malicious"] * 8 + ["maliciousness", "malicious", None]
        for spelling in spellings[:8]:
            with pytest.raises(psycopg.errors.CheckViolation, match="malicious_spelt_exactly"):
                conn.execute("UPDATE dead_letter_events SET classification = %s", (spelling,))
        checked = conn.execute(
            "SELECT conrelid::regclass::text FROM pg_constraint WHERE conname LIKE '%malicious_spelt_exactly' "
            "AND convalidated AND conrelid IN ('dead_letter_events'::regclass, 'dlq_poison_events'::regclass) "
            "ORDER BY 1"
        ).fetchall()
        assert checked == [("dead_letter_events",), ("dlq_poison_events",)]  # the poison table holds the same rule
