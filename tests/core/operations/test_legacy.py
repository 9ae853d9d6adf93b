"""The legacy upgrade on a real server: every row survives with its values, in the caller's transaction only."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
import sqlalchemy

from dlq_assets import upgrade_to_enhanced_dlq
from dlq_assets.core import jsonutil
from dlq_assets.core.db import sqlalchemy_url
from dlq_assets.core.migrations import MigrationError, discover
from dlq_assets.core.operations import legacy
from dlq_assets.core.operations.legacy import LEGACY_TABLE, LegacyUpgradeError, UpgradeReport

LEGACY_DDL = """
CREATE TABLE dead_letter_events (
    id            serial PRIMARY KEY,
    ingest_id     varchar(64),
    source        varchar(512),
    source_offset integer,
    reason        varchar(128),
    payload       json,
    metadata_json json,
    resolved      boolean DEFAULT false,
    resolved_at   timestamptz,
    created_at    timestamptz DEFAULT now(),
    operator_note text
);
-- Same name as an index of the enhanced schema: the upgrade must move it out of the way.
CREATE INDEX ix_dead_letter_events_source_offset ON dead_letter_events (source, source_offset);
CREATE INDEX dead_letter_events_unresolved ON dead_letter_events (created_at) WHERE NOT resolved;
"""
COLUMNS = "id, ingest_id, source, source_offset, reason, payload, metadata_json, resolved, resolved_at, created_at"
SNAPSHOT = (
    "SELECT id, ingest_id, source, source_offset, reason, payload::text, metadata_json::text, resolved, resolved_at, "
    "created_at FROM {} ORDER BY id"
)
NUL_PAYLOAD = '{"msg": "nul \\u0000 byte", "n": 1}'  # json accepts the escape, jsonb refuses it
FAR_PAST = datetime(2009, 2, 27, 23, 30, tzinfo=UTC)  # more than dlq_ensure_partitions' 120 months back
EXPECTED_DUPLICATES = 3  # a pair with a source position, a triple without one


def legacy_rows() -> list[tuple[Any, ...]]:
    """A few hundred rows over many months (one far back, one on a month boundary in another zone)."""
    starts = [
        FAR_PAST,
        datetime(2024, 2, 29, 23, 30, tzinfo=timezone(timedelta(hours=-5))),  # 2024-03-01 in UTC
        datetime(2025, 6, 15, 8, tzinfo=UTC),
        datetime.now(UTC) - timedelta(days=1),
    ]
    rows = []
    for i in range(300):
        created = starts[i % 4] + timedelta(seconds=i)
        source, offset = (None, None) if i % 11 == 0 else (f"/var/log/cowrie/cowrie.json.{i % 3}", i * 512)
        if i % 5 == 0:  # json text as a producer wrote it: spacing, trailing zeros
            payload = f'{{ "i": {i},  "price": 1.50, "big": 1e3, "k": "last" }}'
        elif i % 7 == 0:  # a repeated key, which jsonb would keep one value of: kept as the text it is
            payload = f'{{ "i": {i}, "k": "first", "k": "last" }}'
        else:
            payload = json.dumps({"i": i, "user": "Zoë 🐍 日本", "nested": {"list": [i, str(i), None, True]}})
        metadata = None if i % 2 else json.dumps({"attempt": i % 4, "host": "sensor-1"})
        resolved = i % 3 == 0
        rows.append((f"ingest-{i}", source, offset, "json_parse_error", payload, metadata, resolved,
                     created + timedelta(hours=1) if resolved else None, created))  # fmt: skip
    now = datetime.now(UTC)
    rows += [("dup", "/var/log/cowrie/cowrie.json", 4242, "dup", '{"dup": true}', None, False, None, now)] * 2
    rows += [("orphan", None, None, "orphan", '{"orphan": 1}', '{"seen": 1}', False, None, now)] * 3
    rows.append(("nul", "/var/log/x", 7, "bad_text", NUL_PAYLOAD, '{"k": "v"}', False, None, now))
    return rows


def make_legacy(url: str, rows: list[tuple[Any, ...]]) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(LEGACY_DDL)
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO dead_letter_events ({COLUMNS.removeprefix('id, ')}, operator_note) "
                "VALUES (%s, %s, %s, %s, %s::json, %s::json, %s, %s, %s, 'kept in the backup only')",
                rows,
            )
        # The sequence has handed out ids no row holds (deleted rows): the new table must not reuse them.
        conn.execute("SELECT nextval('dead_letter_events_id_seq') FROM generate_series(1, 3)")


def query(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(statement, params).fetchall()


def snapshot(url: str, table: str = "dead_letter_events") -> list[tuple[Any, ...]]:
    return query(url, SNAPSHOT.format(table))


def relkind(url: str, name: str) -> str | None:
    row = query(url, "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (name,))
    return row[0][0] if row else None


@contextmanager
def engine_for(url: str) -> Iterator[sqlalchemy.Engine]:
    engine = sqlalchemy.create_engine(sqlalchemy_url(url))
    try:
        yield engine
    finally:
        engine.dispose()


def upgrade_committed(url: str, **kwargs: Any) -> UpgradeReport:
    """The design document's call, exactly."""
    with engine_for(url) as engine, engine.connect() as connection:
        report = upgrade_to_enhanced_dlq(connection, **kwargs)
        connection.commit()
    return report


def derived_key(source: str | None, offset: int | None, checksum: str) -> str:
    parts = [str(p) for p in (source, offset, checksum) if p is not None]  # concat_ws skips NULLs
    return "sha256:" + hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()


def assert_legacy_untouched(url: str, before: list[tuple[Any, ...]], indexes: set[str]) -> None:
    assert relkind(url, "dead_letter_events") == "r"
    assert relkind(url, LEGACY_TABLE) is None
    assert relkind(url, "dlq_schema_migrations") is None
    assert snapshot(url) == before
    assert legacy_indexes(url, "dead_letter_events") == indexes


def legacy_indexes(url: str, table: str) -> set[str]:
    found = query(url, "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass", (table,))
    return {name for (name,) in found}


def test_upgrade_keeps_every_row_and_value_then_is_a_no_op(empty_db_url: str) -> None:
    url = empty_db_url
    make_legacy(url, legacy_rows())
    before = snapshot(url)
    repeated = {r[0] for r in before if r[5] and '"k": "first"' in r[5]}
    (last_handed_out,) = query(url, "SELECT last_value FROM dead_letter_events_id_seq")[0]
    assert last_handed_out > before[-1][0]

    report = upgrade_committed(url)

    assert report == UpgradeReport(
        upgraded=True,
        rows_copied=len(before),
        wrapped_payloads=1 + len(repeated),
        duplicate_keys_disambiguated=EXPECTED_DUPLICATES,
        legacy_table=LEGACY_TABLE,
        migrations_applied=[m.name for m in discover()],
    )
    assert relkind(url, "dead_letter_events") == "p"
    after = snapshot(url)
    assert [r[0] for r in after] == [r[0] for r in before]
    wrapped = {r[0] for r in before if r[5] == NUL_PAYLOAD}
    assert len(wrapped) == 1
    for old, new in zip(before, after, strict=True):
        scalars = (0, 1, 2, 3, 4, 7, 8, 9)  # everything but payload and metadata_json
        assert [new[i] for i in scalars] == [old[i] for i in scalars]
        if old[0] in wrapped:
            assert json.loads(new[5]) == {"raw_text": NUL_PAYLOAD}  # the original text, exactly
            assert json.loads(new[6]) == {"k": "v", "legacy_payload_not_jsonb": True}
        if old[0] in repeated:
            assert json.loads(new[5]) == {"raw_text": old[5]}
            assert json.loads(new[6]) == {**json.loads(old[6] or "{}"), "legacy_duplicate_keys": True}
    wrapped |= repeated
    # jsonb equality with the legacy json cast to jsonb, for every other row.
    ids, payloads, metadata = zip(*[(r[0], r[5], r[6]) for r in before if r[0] not in wrapped], strict=True)
    differing = query(
        url,
        "SELECT s.id FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS s(id, payload, metadata) "
        "JOIN dead_letter_events e USING (id) "
        "WHERE e.payload IS DISTINCT FROM s.payload::jsonb OR e.metadata_json IS DISTINCT FROM s.metadata::jsonb",
        (list(ids), list(payloads), list(metadata)),
    )
    assert differing == []

    # Checksums as Python computes them, keys as the trigger derives them, later duplicates suffixed.
    rows = query(
        url,
        "SELECT id, source, source_offset, payload::text, payload_checksum, idempotency_key, "
        "tableoid::regclass::text, created_at FROM dead_letter_events ORDER BY id",
    )
    seen: set[str] = set()
    suffixed = 0
    for event_id, source, offset, payload, checksum, key, partition, created_at in rows:
        assert checksum == jsonutil.payload_checksum(jsonutil.loads(payload))
        derived = derived_key(source, offset, checksum)
        if derived in seen:
            assert key == f"{derived}:legacy:{event_id}"
            suffixed += 1
        else:
            assert key == derived
        seen.add(derived)
        assert partition == f"dead_letter_events_p{created_at.astimezone(UTC):%Y%m}"
    assert suffixed == EXPECTED_DUPLICATES
    assert len({r[5] for r in rows}) == len(rows)
    assert query(url, "SELECT count(*) FROM dlq_idempotency_keys k JOIN dead_letter_events e ON e.id = k.event_id "
                      "AND e.idempotency_key = k.idempotency_key")[0] == (len(rows),)  # fmt: skip
    assert query(url, "SELECT to_regclass('dead_letter_events_p200902')::text") == [("dead_letter_events_p200902",)]

    # The backup keeps every row (and the column the new table has no place for); its names are out of the way.
    assert snapshot(url, LEGACY_TABLE) == before
    assert query(url, f"SELECT count(*) FROM {LEGACY_TABLE} WHERE operator_note IS NOT NULL") == [(len(before),)]
    assert legacy_indexes(url, LEGACY_TABLE) == {
        "dead_letter_events_pkey_legacy",
        "ix_dead_letter_events_source_offset_legacy",
        "dead_letter_events_unresolved_legacy",
    }
    primary_key = f"SELECT conname FROM pg_constraint WHERE conrelid = '{LEGACY_TABLE}'::regclass AND contype = 'p'"
    assert query(url, primary_key) == [("dead_letter_events_pkey_legacy",)]
    assert query(url, f"SELECT pg_get_serial_sequence('{LEGACY_TABLE}', 'id')") == [
        ("public.dead_letter_events_id_seq_legacy",)
    ]

    # Twice is a no-op.
    full = "SELECT * FROM dead_letter_events ORDER BY id"
    tables_before = (query(url, full), query(url, "TABLE dlq_idempotency_keys ORDER BY 1"), snapshot(url, LEGACY_TABLE))
    assert upgrade_committed(url) == UpgradeReport(False, 0, 0, 0, LEGACY_TABLE, [])
    assert (query(url, full), query(url, "TABLE dlq_idempotency_keys ORDER BY 1"), snapshot(url, LEGACY_TABLE)) == (
        tables_before
    )

    # New events continue after every id the legacy sequence handed out.
    with psycopg.connect(url) as conn:
        (new_id,) = conn.execute(
            "INSERT INTO dead_letter_events (reason, payload) VALUES ('new', '{}') RETURNING id"
        ).fetchone()
    assert new_id > last_handed_out


def test_without_the_callers_commit_nothing_persists(empty_db_url: str) -> None:
    make_legacy(empty_db_url, legacy_rows())
    before, indexes = snapshot(empty_db_url), legacy_indexes(empty_db_url, "dead_letter_events")
    with engine_for(empty_db_url) as engine, engine.connect() as connection:
        assert upgrade_to_enhanced_dlq(connection).upgraded
        assert connection.execute(sqlalchemy.text("SELECT count(*) FROM dead_letter_events")).scalar() == len(before)
    assert_legacy_untouched(empty_db_url, before, indexes)


def test_concurrent_upgrades_copy_once(empty_db_url: str) -> None:
    rows = legacy_rows()
    make_legacy(empty_db_url, rows)
    reports: list[UpgradeReport] = []
    threads = [threading.Thread(target=lambda: reports.append(upgrade_committed(empty_db_url))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted((r.upgraded, r.rows_copied) for r in reports) == [(False, 0), (False, 0), (True, len(rows))]
    assert query(empty_db_url, "SELECT count(*) FROM dead_letter_events") == [(len(rows),)]


def test_psycopg_connection_and_drop_legacy(empty_db_url: str) -> None:
    rows = legacy_rows()
    make_legacy(empty_db_url, rows)
    with psycopg.connect(empty_db_url) as conn:
        assert upgrade_to_enhanced_dlq(conn, drop_legacy=True).upgraded
        conn.rollback()  # nothing without the commit
        assert relkind(empty_db_url, "dead_letter_events") == "r"
        report = upgrade_to_enhanced_dlq(conn, drop_legacy=True)
        conn.commit()
    assert (report.upgraded, report.rows_copied, report.legacy_table) == (True, len(rows), None)
    assert relkind(empty_db_url, LEGACY_TABLE) is None
    assert relkind(empty_db_url, "dead_letter_events_id_seq_legacy") is None
    assert query(empty_db_url, "SELECT count(*) FROM dead_letter_events") == [(len(rows),)]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"autocommit": True}, ValueError),
        ({"isolation_level": psycopg.IsolationLevel.REPEATABLE_READ}, LegacyUpgradeError),
    ],
)
def test_refuses_connections_that_could_commit_part_or_miss_rows(
    empty_db_url: str, options: dict[str, Any], error: type[Exception]
) -> None:
    make_legacy(empty_db_url, legacy_rows()[:20])
    before, indexes = snapshot(empty_db_url), legacy_indexes(empty_db_url, "dead_letter_events")
    with psycopg.connect(empty_db_url) as conn:
        for name, value in options.items():
            setattr(conn, name, value)
        with pytest.raises(error):
            upgrade_to_enhanced_dlq(conn)
    assert_legacy_untouched(empty_db_url, before, indexes)


def test_empty_database_gets_the_enhanced_schema(empty_db_url: str) -> None:
    assert upgrade_committed(empty_db_url) == UpgradeReport(False, 0, 0, 0, None, [m.name for m in discover()])
    assert relkind(empty_db_url, "dead_letter_events") == "p"
    assert upgrade_committed(empty_db_url) == UpgradeReport(False, 0, 0, 0, None, [])


def test_a_failing_migration_leaves_the_legacy_table_untouched(empty_db_url: str) -> None:
    make_legacy(empty_db_url, legacy_rows())
    with psycopg.connect(empty_db_url) as conn:  # a legacy raw_events the enhanced schema cannot create over
        conn.execute("CREATE TABLE raw_events (id serial PRIMARY KEY, line text)")
    before, indexes = snapshot(empty_db_url), legacy_indexes(empty_db_url, "dead_letter_events")
    with pytest.raises(MigrationError, match='relation "raw_events" already exists'):
        upgrade_committed(empty_db_url)
    assert_legacy_untouched(empty_db_url, before, indexes)


def test_a_copy_that_loses_rows_fails_verification_and_rolls_back(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_legacy(empty_db_url, legacy_rows())
    before, indexes = snapshot(empty_db_url), legacy_indexes(empty_db_url, "dead_letter_events")
    lossy = legacy._COPY.replace("FROM dead_letter_events_legacy l", "FROM dead_letter_events_legacy l WHERE l.id > 3")
    assert lossy != legacy._COPY
    monkeypatch.setattr(legacy, "_COPY", lossy)
    with pytest.raises(LegacyUpgradeError, match="3 legacy ids are missing"):
        upgrade_committed(empty_db_url)
    assert_legacy_untouched(empty_db_url, before, indexes)


def test_values_the_enhanced_schema_forbids_get_defaults_and_flags(empty_db_url: str) -> None:
    created = datetime(2023, 7, 4, tzinfo=UTC)
    make_legacy(
        empty_db_url,
        [
            (None, None, None, None, None, None, None, None, None),
            ("a", "s", 1, "r", NUL_PAYLOAD, "[1, 2]", True, created, created),
            ("b", "s", 2, "r", "{}", '{"note": "nul \\u0000"}', False, None, created),
        ],
    )
    assert upgrade_committed(empty_db_url).rows_copied == 3
    rows = query(
        empty_db_url, "SELECT reason, resolved, created_at, payload, metadata_json FROM dead_letter_events ORDER BY id"
    )
    (reason, resolved, created_at, payload, metadata) = rows[0]
    assert (reason, resolved, payload) == ("unknown", False, None)
    assert metadata == {"legacy_null_columns": ["reason", "resolved", "created_at", "payload"]}
    assert created_at > created  # the upgrade's time: the best there is for a row that never had one
    assert rows[1][3:] == (
        {"raw_text": NUL_PAYLOAD},
        {"legacy_metadata": [1, 2], "legacy_payload_not_jsonb": True},
    )
    assert rows[2][3:] == (
        {},
        {"legacy_metadata_not_jsonb": True, "legacy_metadata_raw_text": '{"note": "nul \\u0000"}'},
    )
