"""Claiming: the columns a claim reads, the ClaimedEvent built from them, the checksum check, a transaction lease's
journal, and the batch session through which a handler claims a batch's neighbours and probes for unresolved
records next to a span.

The claim columns are ClaimedEvent's fields in order (the lease last), so a row becomes an event positionally.
"""

from __future__ import annotations

import hashlib
import select
import uuid
from collections.abc import Sequence
from typing import Any, LiteralString

import psycopg
from psycopg import pq

from dlq_assets.core.db import bigint_array, text_array
from dlq_assets.core.processing.handlers import ClaimedEvent

_CLAIM_COLUMNS = (  # the payload form and a raw record's text read here, not decoded from JSON per event
    "id, created_at, reason, source, source_inode, source_offset, payload::text, payload_checksum, "
    "coalesce(metadata_json, '{}'::jsonb)::text, retry_count, priority, metadata_json ->> 'payload_form', "
    "CASE WHEN metadata_json ->> 'payload_form' = 'raw_text' AND jsonb_typeof(payload -> 'raw_text') = 'string' "
    "THEN payload ->> 'raw_text' END, processing_lock"
)
_CLAIMED_FIELDS = 13  # the columns before processing_lock, one per ClaimedEvent field


def _claim_rows(conn: psycopg.Connection[Any], call: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """``_CLAIM_COLUMNS`` of a claim function's rows, fetched in binary: the same values, loaded with less work
    than their text (1.33 vs 1.65 ms per 1,000)."""
    return conn.execute(f"SELECT {_CLAIM_COLUMNS} FROM {call}", params, binary=True).fetchall()


def _claimed(row: Sequence[Any]) -> ClaimedEvent:
    # positionally (_CLAIM_COLUMNS are the dataclass's fields in order, the lease last): a third of the keyword call
    return ClaimedEvent(*row[:_CLAIMED_FIELDS])


def _checksum_ok(event: ClaimedEvent) -> bool:
    # payload::text is the canonical form, so its SHA-256 is the checksum taken at insert, unless tampered.
    return hashlib.sha256(event.payload_text.encode("utf-8")).hexdigest() == event.payload_checksum


_JOURNAL_BATCH = b"SELECT dlq_journal_batch($1::uuid, $2::bigint[], $3::text)"
# A neighbours' entry: committed without waiting for its WAL flush (the batch's own COMMIT flushes it). A server
# crash before that loses it, and with it the neighbours' charge for that batch; the batch's own events, whose
# entry is flushed, are charged, and a neighbour is a batch's own event when it comes up in turn.
_JOURNAL_NEIGHBOURS = (
    b"SELECT set_config('synchronous_commit', 'off', true), dlq_journal_batch($1::uuid, $2::bigint[], $3::text)"
)


class _Journal:
    """A transaction lease's journal: the worker's second session, whose statements commit at once.

    A batch's entry is sent as soon as the batch is claimed and its commit collected before any handler sees an
    event: the worker builds and verifies the events meanwhile instead of waiting for the commit's WAL flush. Not
    later: the holder's own session ending (a worker killed) releases the lease's lock, and an entry that reaches
    the server after that is refused as not held, so a worker an event kills would go uncharged."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.error: psycopg.Error | None = None  # what the last entry failed with, raised by settle()
        self._sent = False

    def send(self, lease: uuid.UUID, ids: Sequence[int], worker: str | None, *, flushed: bool = True) -> None:
        """Send an entry; the one before is settled first (one statement at a time on a connection). ``flushed``:
        its commit waits for the WAL flush (see _JOURNAL_NEIGHBOURS for the entries that do not)."""
        self.settle()
        params = [str(lease).encode(), bigint_array(ids).encode(), None if worker is None else worker.encode()]
        try:
            self.conn.pgconn.send_query_params(_JOURNAL_BATCH if flushed else _JOURNAL_NEIGHBOURS, params)
        except psycopg.Error as exc:
            self.error = exc
            raise
        self._sent = True

    def settle(self) -> None:
        """Wait until the entry sent last is committed; raise what it failed with."""
        if not self._sent:
            return
        self._sent = False
        try:
            self._collect()
        except psycopg.Error as exc:
            self.error = exc
            raise

    def _collect(self) -> None:
        pgconn, error = self.conn.pgconn, None
        while pgconn.is_busy():  # waiting in select(), not in libpq: the heartbeat thread runs meanwhile
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
        while (result := pgconn.get_result()) is not None:
            if result.status != pq.ExecStatus.TUPLES_OK and error is None:
                error = psycopg.errors.error_from_result(result, encoding=self.conn.info.encoding)
        if pgconn.status == pq.ConnStatus.BAD:  # libpq's own error (no SQLSTATE): the connection is gone
            raise psycopg.OperationalError(f"the journal's connection failed: {pgconn.get_error_message()}")
        if error is not None:
            raise error

    def execute(self, query: LiteralString) -> None:
        """Any other statement, after the entry in flight."""
        self.settle()
        self.conn.execute(query)


class _BatchSession:
    """What a handler may do with the batch's lease: take neighbours; the worker heartbeats through it."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        lease: uuid.UUID,
        lease_seconds: int,
        journal_conn: _Journal | None = None,
        worker_name: str | None = None,
    ) -> None:
        self.conn, self.lease, self.lease_seconds = conn, lease, lease_seconds
        self.journal_conn, self.worker_name = journal_conn, worker_name
        self.neighbours: list[ClaimedEvent] = []
        self.tampered: list[ClaimedEvent] = []  # neighbours whose checksum failed: quarantined, never handed on
        self.held: list[int] = []  # every event this lease holds (a transaction lease writes no lock column)

    def journal(self, ids: list[int], *, flushed: bool = True) -> None:
        """Record events a transaction lease holds, committed on their own, so a crash is counted (40_claims.sql);
        sent here, committed by :meth:`settle`."""
        self.held.extend(ids)
        if self.journal_conn is not None and ids:
            self.journal_conn.send(self.lease, ids, self.worker_name, flushed=flushed)

    def settle(self) -> None:
        """The batch's journal entries committed: before a handler sees their events, and before the neighbours'
        claim and the completion, which read them."""
        if self.journal_conn is not None:
            self.journal_conn.settle()

    def journal_failed(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the journal's failure: the batch's, never a handler's."""
        return self.journal_conn is not None and exc is self.journal_conn.error

    def claim_neighbours_of(self, events: Sequence[ClaimedEvent], window_bytes: int) -> list[ClaimedEvent]:
        """One statement for the whole batch (one per event costs more than the batch), contiguous records only.
        Neighbours are verified like the batch's own events: a tampered one is kept back for quarantine."""
        ids = [e.id for e in events if e.source is not None and e.source_offset is not None]
        if not ids:
            return []
        self.settle()  # the claim accepts only events journalled under the lease
        rows = _claim_rows(
            self.conn,
            "dlq_claim_fragment_chains(%s, %s::bigint[], %s, %s)",
            (self.lease, bigint_array(ids), window_bytes, self.lease_seconds),
        )
        self.journal([r[0] for r in rows], flushed=False)
        found = [_claimed(r) for r in rows]
        verified: list[ClaimedEvent] = []
        for event in found:
            (verified if _checksum_ok(event) else self.tampered).append(event)
        self.neighbours.extend(verified)
        self.settle()  # on record before the handler sees them
        return verified

    def unresolved_next_to_any(self, spans: Sequence[tuple[str, str | None, int, int]]) -> set[int]:
        """Indexes of the spans with an unresolved dead letter outside this lease right before them."""
        if not spans:
            return set()
        sources, inodes, starts, ends = zip(*spans, strict=True)
        rows = self.conn.execute(
            """
            SELECT s.n - 1 FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[])
                   WITH ORDINALITY AS s(source, inode, start_at, end_at, n)
             CROSS JOIN LATERAL (  -- per span, one probe of the partial (source, source_offset) index: the nearest
                   -- unresolved dead letter before it (records never overlap, so only that one can end right where
                   -- the span starts)
                   SELECT 1 FROM (
                        SELECT d.* FROM dead_letter_events d
                         WHERE d.source = s.source AND d.source_inode IS NOT DISTINCT FROM s.inode
                           AND d.source_offset < s.start_at AND d.source_offset >= s.start_at - %s
                           AND NOT d.resolved
                         ORDER BY d.source_offset DESC LIMIT 1) d
                    WHERE d.source_offset + dlq_record_bytes(d.metadata_json) + 1 IN (s.start_at, s.start_at - 1)
                      AND d.quarantined_at IS NULL AND d.processing_lock IS DISTINCT FROM %s
                      AND d.classification IS DISTINCT FROM 'malicious'  -- never claimed: nothing to wait for
                      AND d.id <> ALL (%s::bigint[])
                    LIMIT 1) found
            """,
            (
                text_array(sources),
                text_array(inodes),
                bigint_array(starts),
                bigint_array(ends),
                64 * 1024,
                self.lease,
                bigint_array(self.held),
            ),
        ).fetchall()
        return {n for (n,) in rows}
