"""Writing the repaired events to ``raw_events``: one statement per batch, idempotent by source position."""

from __future__ import annotations

from typing import Any

import psycopg

from dlq_assets.core import jsonutil
from dlq_assets.core.db import JSON_TEXTS_SQL, bigint_array, json_texts, text_array
from dlq_assets.core.processing.handlers import Target

_INSERT_TARGETS = f"""
    INSERT INTO raw_events (source, source_inode, source_offset, eventid, session, src_ip, event_timestamp,
                            payload, dlq_event_id, repair_strategy, partial)
    SELECT t.source, t.inode, t.off, t.payload->>'eventid', t.payload->>'session',
           (t.payload->>'src_ip')::inet, (t.payload->>'timestamp')::timestamptz, t.payload, t.dlq_id, t.strategy,
           t.strategy = 'truncation_closed'
      FROM (SELECT u.source, u.inode, u.off, u.payload::jsonb AS payload, u.dlq_id, u.strategy
              FROM unnest(%s::text[], %s::text[], %s::bigint[], {JSON_TEXTS_SQL}, %s::bigint[], %s::text[])
                   AS u(source, inode, off, payload, dlq_id, strategy)
            OFFSET 0) t  -- each payload parsed once: flattened, every reference above would cast it again
"""


class TargetRowsMissing(psycopg.DataError):
    """The target took the statement but holds no row with the event at some positions (a trigger returning NULL,
    a rule, another event's row there already): an event resolved there would have no target row, so the write
    counts as refused."""


# Positions holding no row with the event's payload: none at all, or another event's (two dead letters claiming one
# position with different contents: the idempotent insert would take the other's row for this event's).
_MISSING = f"""
    SELECT t.source, t.off FROM unnest(%s::text[], %s::text[], %s::bigint[], {JSON_TEXTS_SQL})
                                AS t(source, inode, off, payload)
     WHERE NOT EXISTS (SELECT FROM raw_events r
                        WHERE r.source = t.source AND r.source_inode = t.inode AND r.source_offset = t.off
                          AND r.payload = t.payload::jsonb)
"""


def _write_targets(conn: psycopg.Connection[Any], targets: list[Target]) -> int:
    """Payloads go as the JSON text at hand (jsonb canonicalises it), joined unescaped (see JSON_TEXTS_SQL); the
    checksum is the stored payload's, derived by the table (a generated column).

    Idempotent by position: a plain INSERT in a savepoint first, and only when a position is in raw_events
    already (a redrive, a duplicate dead letter) the batch again with ON CONFLICT DO NOTHING. ON CONFLICT makes
    every row a speculative insertion: 3 ms more per 1,000 rows, paid for the rare conflict. Fewer rows than
    targets (a conflict, or a target that drops rows silently) are looked up: a position holding no row with the
    event's payload (none, or another event's) raises ``TargetRowsMissing``, and its events are failed like any
    refused write."""
    if not targets:
        return 0
    events, sources, inodes, offsets, dlq_ids, strategies, texts = zip(*targets, strict=True)
    if None in texts:
        texts = tuple(jsonutil.canonical_json(e) if t is None else t for e, t in zip(events, texts, strict=True))
    params = (text_array(sources), text_array(inodes), bigint_array(offsets), json_texts(texts),
              bigint_array(dlq_ids), text_array(strategies))  # fmt: skip
    try:
        with conn.transaction():
            written = conn.execute(_INSERT_TARGETS, params).rowcount
    except psycopg.errors.UniqueViolation:
        conflict = "ON CONFLICT ON CONSTRAINT raw_events_source_position DO NOTHING"
        written = conn.execute(_INSERT_TARGETS + conflict, params).rowcount
    if written < len(targets):  # positions already there, or rows the target dropped without an error
        missing = conn.execute(_MISSING, params[:4]).fetchall()
        if missing:
            source, offset = missing[0]
            raise TargetRowsMissing(
                f"the target holds no row with the event at {len(missing)} position(s), {source}:{offset} first"
            )
    return written
