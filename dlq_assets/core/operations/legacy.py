"""Upgrade a pre-enhanced ``dead_letter_events`` table to the partitioned enhanced schema, in place.

Everything happens in the caller's transaction, so the caller's commit publishes the whole upgrade and anything
else (an error, no commit) leaves the legacy table exactly as it was. The legacy table is kept, renamed to
``dead_letter_events_legacy``, as a backup: drop it yourself once satisfied, or pass ``drop_legacy=True``.
Rows are never lost: payloads jsonb cannot hold are wrapped with their original text, NULLs the enhanced
schema forbids get a default and a flag in ``metadata_json``, and clashing idempotency keys get a suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from dlq_assets.core.migrations import MIGRATION_LOCK_KEY, apply_in_transaction

if TYPE_CHECKING:
    import sqlalchemy

TABLE = "dead_letter_events"
LEGACY_TABLE = "dead_letter_events_legacy"
_SUFFIX = "_legacy"
_MAX_NAME_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are truncated, and could then clash
LEGACY_COLUMNS = frozenset(
    {
        "id",
        "ingest_id",
        "source",
        "source_offset",
        "reason",
        "payload",
        "metadata_json",
        "resolved",
        "resolved_at",
        "created_at",
    }
)


class LegacyUpgradeError(RuntimeError):
    """The legacy table cannot be upgraded safely; the caller's transaction must roll back."""


@dataclass(frozen=True)
class UpgradeReport:
    upgraded: bool  # a legacy table was found and copied
    rows_copied: int
    wrapped_payloads: int  # payloads stored as {"raw_text": ...} because jsonb could not hold them
    duplicate_keys_disambiguated: int  # rows whose derived idempotency key got a ":legacy:<id>" suffix
    legacy_table: str | None  # the backup table, when one exists
    migrations_applied: list[str]


def upgrade_to_enhanced_dlq(
    connection: sqlalchemy.Connection | psycopg.Connection[Any], *, drop_legacy: bool = False
) -> UpgradeReport:
    """Bring the database to the enhanced schema, copying a legacy table's rows; the caller commits.

    Accepts a SQLAlchemy ``Connection`` on the psycopg 3 driver or a psycopg 3 ``Connection``. Safe to run
    again: on an enhanced (or empty) database it only applies pending migrations. SQL errors propagate.
    """
    conn = _psycopg_connection(connection)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))  # one upgrader or migrator at a time
    kind = _relkind(conn, TABLE)
    if kind == "r":
        return _upgrade(conn, drop_legacy)
    if kind not in (None, "p"):
        raise LegacyUpgradeError(f"{TABLE} exists but is neither a table nor a partitioned table (relkind {kind})")
    applied = [m.name for m in apply_in_transaction(conn)]
    backup = LEGACY_TABLE if _relkind(conn, LEGACY_TABLE) else None
    return UpgradeReport(False, 0, 0, 0, backup, applied)


def _psycopg_connection(connection: Any) -> psycopg.Connection[Any]:
    """The psycopg connection under the caller's open transaction (a SQLAlchemy one is begun if need be)."""
    if not isinstance(connection, psycopg.Connection):
        from sqlalchemy.engine import Connection  # lazy: psycopg callers need no SQLAlchemy import

        if not isinstance(connection, Connection):
            raise TypeError(f"expected a SQLAlchemy or psycopg 3 Connection, got {type(connection).__name__}")
        if not connection.in_transaction():
            connection.begin()  # so the caller's connection.commit() commits our work
        connection = connection.connection.driver_connection
        if not isinstance(connection, psycopg.Connection):
            raise TypeError("the SQLAlchemy engine must use the psycopg 3 driver (postgresql+psycopg://)")
    if connection.autocommit and connection.info.transaction_status == TransactionStatus.IDLE:
        raise ValueError("an autocommit connection outside a transaction would commit the upgrade piecemeal")
    return connection


def _relkind(conn: psycopg.Connection[Any], name: str) -> str | None:
    row = conn.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (name,)).fetchone()
    return row[0] if row else None


def _upgrade(conn: psycopg.Connection[Any], drop_legacy: bool) -> UpgradeReport:
    (isolation,) = conn.execute("SHOW transaction_isolation").fetchone()
    if isolation != "read committed":
        # A snapshot older than our table lock would miss rows committed just before it: they would not be copied.
        raise LegacyUpgradeError(f"run the upgrade in a READ COMMITTED transaction, not {isolation.upper()}")
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(TABLE)))
    found = {name for (name,) in conn.execute(_COLUMNS, (TABLE,))}
    if missing := sorted(LEGACY_COLUMNS - found):
        raise LegacyUpgradeError(f"{TABLE} is neither the legacy nor the enhanced table: it lacks {missing}")
    if _relkind(conn, LEGACY_TABLE):
        raise LegacyUpgradeError(f"{LEGACY_TABLE} already exists; drop or rename that old backup first")

    id_sequence = _rename_legacy(conn)
    applied = [m.name for m in apply_in_transaction(conn)]
    if _relkind(conn, TABLE) != "p":
        raise LegacyUpgradeError(f"the migrations did not create {TABLE}: the ledger says they ran before")
    conn.execute(_PARTITIONS)
    conn.execute(_JSONB_OR_NULL)
    conn.execute(_KEY_COUNTS)
    copied, wrapped, disambiguated = conn.execute(_COPY).fetchone()
    conn.execute("DROP FUNCTION pg_temp.dlq_legacy_jsonb(text), pg_temp.dlq_legacy_keys(json)")
    conn.execute(_ADVANCE_SEQUENCE, {"legacy_sequence": id_sequence})
    _verify(conn)
    if drop_legacy:
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(LEGACY_TABLE)))
    return UpgradeReport(True, copied, wrapped, disambiguated, None if drop_legacy else LEGACY_TABLE, applied)


def _legacy_name(name: str) -> str:
    head = name.encode("utf-8")[: _MAX_NAME_BYTES - len(_SUFFIX)].decode("utf-8", errors="ignore")
    return head + _SUFFIX


def _rename_legacy(conn: psycopg.Connection[Any]) -> int | None:
    """Rename the table, its sequences and indexes (and so its key constraints); returns the id sequence's oid."""
    owned = conn.execute(_OWNED_RELATIONS, {"table": TABLE}).fetchall()
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(TABLE), sql.Identifier(LEGACY_TABLE)))
    for qualified, name, relkind in {row[0]: row[1:4] for row in owned}.values():
        kind = sql.SQL("SEQUENCE" if relkind == "S" else "INDEX")
        conn.execute(
            sql.SQL("ALTER {} {} RENAME TO {}").format(kind, sql.SQL(qualified), sql.Identifier(_legacy_name(name)))
        )
    return next((oid for oid, _, _, relkind, column in owned if relkind == "S" and column == "id"), None)


def _verify(conn: psycopg.Connection[Any]) -> None:
    """Refuse to hand back a transaction that lost a row: same count, and every legacy id is present."""
    legacy, enhanced, missing = conn.execute(_VERIFY).fetchone()
    if legacy != enhanced or missing:
        raise LegacyUpgradeError(
            f"copy check failed: {LEGACY_TABLE} has {legacy} rows, {TABLE} has {enhanced}, "
            f"{missing} legacy ids are missing; roll back"
        )


_COLUMNS = "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped"

# Sequences behind the table's column defaults (serial, or hand-made) and identity columns, then its indexes.
# An index backing a constraint (the primary key) renames the constraint with it.
_OWNED_RELATIONS = """
SELECT s.oid, s.oid::regclass::text, s.relname, s.relkind, a.attname
  FROM pg_attrdef ad
  JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass
  JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
  JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
 WHERE ad.adrelid = to_regclass(%(table)s)
UNION
SELECT s.oid, s.oid::regclass::text, s.relname, s.relkind, a.attname
  FROM pg_depend d
  JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
  JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
 WHERE d.classid = 'pg_class'::regclass AND d.refobjid = to_regclass(%(table)s) AND d.deptype IN ('a', 'i')
UNION
SELECT i.oid, i.oid::regclass::text, i.relname, i.relkind, NULL
  FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
 WHERE x.indrelid = to_regclass(%(table)s)
"""

# Only the months that hold rows: a contiguous range from a years-old row would exceed
# dlq_ensure_partitions' 120-month cap and create hundreds of empty partitions. Rows without a finite
# created_at land in the default partition.
_PARTITIONS = """
SELECT count(*)
  FROM (SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS month
          FROM dead_letter_events_legacy WHERE isfinite(created_at)) m,
       LATERAL dlq_ensure_partitions(m.month, 0)
"""

# json accepts what jsonb refuses (\u0000, numbers beyond numeric's range): NULL there, so the row is wrapped,
# never failed. A session-local function, dropped again before the caller sees the transaction.
_JSONB_OR_NULL = """
CREATE OR REPLACE FUNCTION pg_temp.dlq_legacy_jsonb(p_text text) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE STRICT
AS $$
BEGIN
    RETURN p_text::jsonb;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$
"""

# How many keys a json value holds, at every depth: json keeps a key written twice, jsonb only its last value,
# so the text's count and its jsonb's (cast back to json) differ exactly when the text held one twice. Such a
# payload is wrapped too: nothing is dropped.
# A loop over a stack of values, not recursion: jsonb takes nesting deeper than PostgreSQL's stack would.
_KEY_COUNTS = """
CREATE OR REPLACE FUNCTION pg_temp.dlq_legacy_keys(p json) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE STRICT
AS $$
DECLARE
    v_stack json[] := ARRAY[p];
    v_item json;
    v_keys bigint := 0;
BEGIN
    WHILE cardinality(v_stack) > 0 LOOP
        v_item := v_stack[cardinality(v_stack)];
        v_stack := v_stack[1:cardinality(v_stack) - 1];
        IF json_typeof(v_item) = 'object' THEN
            v_keys := v_keys + (SELECT count(*) FROM json_each(v_item));  -- a key written twice counts twice
            v_stack := v_stack || ARRAY(SELECT value FROM json_each(v_item)
                                        WHERE json_typeof(value) IN ('object', 'array'));
        ELSIF json_typeof(v_item) = 'array' THEN
            v_stack := v_stack || ARRAY(SELECT value FROM json_array_elements(v_item)
                                        WHERE json_typeof(value) IN ('object', 'array'));
        END IF;
    END LOOP;
    RETURN v_keys;
END
$$
"""

# The trigger sets payload_checksum and derives idempotency_key (first row of each key); later rows with the
# same derived key would be skipped by the trigger, so they get the key plus ":legacy:<id>". MATERIALIZED: inlined,
# each later reference would re-run the conversion (a subtransaction per call), doubling the upgrade's time.
_COPY = """
WITH converted AS MATERIALIZED (
    SELECT l.id, l.ingest_id, l.source, l.source_offset, l.resolved_at,
           coalesce(l.reason, 'unknown') AS reason,
           coalesce(l.resolved, false) AS resolved,
           coalesce(l.created_at, now()) AS created_at,
           l.payload::text AS payload_text,
           l.metadata_json::text AS metadata_text,
           pg_temp.dlq_legacy_jsonb(l.payload::text) AS parsed_payload,
           pg_temp.dlq_legacy_jsonb(l.metadata_json::text) AS parsed_metadata,
           array_remove(ARRAY[CASE WHEN l.reason IS NULL THEN 'reason' END,
                              CASE WHEN l.resolved IS NULL THEN 'resolved' END,
                              CASE WHEN l.created_at IS NULL THEN 'created_at' END,
                              CASE WHEN l.payload IS NULL THEN 'payload' END], NULL) AS null_columns
      FROM dead_letter_events_legacy l
), checked AS (
    SELECT c.*,
           c.parsed_payload IS NOT NULL AND jsonb_typeof(c.parsed_payload) IN ('object', 'array')
           AND pg_temp.dlq_legacy_keys(c.payload_text::json) <> pg_temp.dlq_legacy_keys(c.parsed_payload::json)
               AS duplicate_keys,
           c.parsed_metadata IS NOT NULL AND jsonb_typeof(c.parsed_metadata) IN ('object', 'array')
           AND pg_temp.dlq_legacy_keys(c.metadata_text::json) <> pg_temp.dlq_legacy_keys(c.parsed_metadata::json)
               AS metadata_duplicate_keys
      FROM converted c
), deduplicated AS (
    SELECT c.*, CASE WHEN c.duplicate_keys THEN NULL ELSE c.parsed_payload END AS payload_jsonb,
           CASE WHEN c.metadata_duplicate_keys THEN NULL ELSE c.parsed_metadata END AS metadata_jsonb
      FROM checked c
), flagged AS (
    SELECT c.*,
           c.payload_text IS NOT NULL AND c.payload_jsonb IS NULL AS wrapped,
           CASE WHEN c.payload_text IS NULL THEN 'null'::jsonb
                ELSE coalesce(c.payload_jsonb, jsonb_build_object('raw_text', c.payload_text)) END AS new_payload,
           jsonb_strip_nulls(jsonb_build_object(
               'legacy_payload_not_jsonb', nullif(c.payload_text IS NOT NULL AND c.parsed_payload IS NULL, false),
               'legacy_duplicate_keys', nullif(c.duplicate_keys, false),
               'legacy_metadata_not_jsonb', nullif(c.metadata_text IS NOT NULL AND c.parsed_metadata IS NULL, false),
               'legacy_metadata_duplicate_keys', nullif(c.metadata_duplicate_keys, false),
               'legacy_metadata_raw_text', CASE WHEN c.metadata_jsonb IS NULL THEN c.metadata_text END,
               'legacy_null_columns', CASE WHEN c.null_columns <> '{}' THEN to_jsonb(c.null_columns) END)) AS flags
      FROM deduplicated c
), ranked AS (
    SELECT f.*,
           CASE WHEN f.flags = '{}' THEN f.metadata_jsonb
                WHEN f.metadata_jsonb IS NULL THEN f.flags
                WHEN jsonb_typeof(f.metadata_jsonb) = 'object' THEN f.metadata_jsonb || f.flags
                ELSE jsonb_build_object('legacy_metadata', f.metadata_jsonb) || f.flags END AS new_metadata,
           k.derived_key,
           row_number() OVER (PARTITION BY k.derived_key ORDER BY f.id) AS key_rank
      FROM flagged f,
           LATERAL (SELECT 'sha256:' || encode(sha256(convert_to(concat_ws('|', f.source, NULL::text, f.source_offset,
                                                                            dlq_payload_checksum(f.new_payload)),
                                                                  'UTF8')), 'hex') AS derived_key) k
), inserted AS (
    INSERT INTO dead_letter_events (id, ingest_id, source, source_offset, reason, payload, metadata_json,
                                    resolved, resolved_at, created_at, idempotency_key)
    SELECT id, ingest_id, source, source_offset, reason, new_payload, new_metadata, resolved, resolved_at, created_at,
           CASE WHEN key_rank > 1 THEN derived_key || ':legacy:' || id END
      FROM ranked
     ORDER BY id
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted), count(*) FILTER (WHERE wrapped), count(*) FILTER (WHERE key_rank > 1)
  FROM ranked
"""

# Past the highest legacy id and past every id the legacy sequence handed out (deleted rows' ids stay unused).
_ADVANCE_SEQUENCE = """
SELECT setval(pg_get_serial_sequence('dead_letter_events', 'id'), m)
  FROM (SELECT greatest((SELECT max(id) FROM dead_letter_events_legacy),
                        pg_sequence_last_value(%(legacy_sequence)s::oid::regclass)) AS m) s
 WHERE m >= 1
"""

_VERIFY = """
SELECT (SELECT count(*) FROM dead_letter_events_legacy),
       (SELECT count(*) FROM dead_letter_events),
       (SELECT count(*) FROM dead_letter_events_legacy l
         WHERE NOT EXISTS (SELECT 1 FROM dead_letter_events e WHERE e.id = l.id))
"""
