"""Ingest Cowrie JSON logs: valid events to ``raw_events``, everything else to the DLQ, nothing lost.

Every record the reader yields ends in exactly one place: a ``raw_events`` row (idempotent on source, inode
and byte offset) or a ``dead_letter_events`` row (idempotent on its key). Records jsonb cannot hold are
wrapped losslessly: ``{"raw_text": ...}`` for UTF-8 text, ``{"raw_base64": ...}`` for bytes that are not.
Each batch commits on its own, so an interrupted ingest resumes by simply running again; a file's last commit
waits for the WAL of all of them to reach disk.

Compressed logs (gzip, bzip2, xz, zstd: known by their magic bytes, see ``dlq_assets.core.intake.compressed``) are read
as their decompressed bytes, and offsets are positions in that stream. When a compressed file is damaged, the
records before the damage are ingested as usual and the undecodable rest of the file becomes one dead letter.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

from dlq_assets.core import jsonutil
from dlq_assets.core.cowrie import validate_event
from dlq_assets.core.db import database_url
from dlq_assets.core.intake.classify import classify_record
from dlq_assets.core.intake.compressed import COMPRESSED_CORRUPT, COMPRESSED_TRUNCATED, Damage, LogStream, open_log
from dlq_assets.core.intake.reader import DEFAULT_MAX_RECORD_BYTES, NOT_STORABLE_JSON, TRUNCATED, Record, read_records
from dlq_assets.core.repair import TRUNCATED_VALUE, tokenizer_fix

VALIDATION_FAILED = "validation_failed"
MAX_SOURCE_CHARACTERS = 512  # the source columns' length
# A batch is a transaction and two COPY statements: its fixed costs (the counting trigger's statement, planned per
# statement; the round trips) are spread over this many records.
DEFAULT_BATCH_SIZE = 2000
# A batch also ends before its records' weight (bytes, plus their values once parsed: ``_weight``) would pass
# this budget, a heavier record alone in its batch: 2,000 records of up to 8 MiB each would hold 16 GiB. Ordinary
# records (3-5 KiB of weight) fill 1,700-2,000 before it.
DEFAULT_BATCH_BYTES = DEFAULT_MAX_RECORD_BYTES
# The damaged tail of a compressed file is kept up to this many bytes (the file itself stays on disk).
MAX_TAIL_BYTES = DEFAULT_MAX_RECORD_BYTES
# Compressed bytes are not text: classified and prioritised like any binary record (classify.py, rule 2).
TAIL_PRIORITY, TAIL_CLASSIFICATION = 9, "binary"
# Cowrie's file and its rotated forms, and any other JSON log; each maybe compressed (by name: the content is
# decided by magic bytes, this only decides which directory entries are logs).
LOG_NAME = re.compile(r"(?:cowrie\.json(?:\.[0-9]{4}-[0-9]{2}-[0-9]{2}|\.[0-9]+)?|.+\.jsonl?)(?:\.(?:gz|bz2|xz|zst))?")


@dataclass
class IngestReport:
    """What one ingest did. ``records`` counts the reader's records written (less one held back at the end of a file
    being written: ``held_back``); a damaged file's tail is one more dead letter (in ``dlq_inserted``/
    ``dlq_duplicates`` and ``dlq_reasons``), listed in ``damaged_files``."""

    ingest_id: str
    files: int = 0
    records: int = 0
    raw_inserted: int = 0
    raw_duplicates: int = 0
    dlq_inserted: int = 0
    dlq_duplicates: int = 0
    dlq_superseded: int = 0  # dead letters of cut reads resolved: the whole record read at their position since
    sanitized: int = 0
    boms_skipped: int = 0
    duplicate_keys: int = 0  # records holding a key twice: kept whole as text beside the payload, and flagged
    dlq_reasons: Counter[str] = field(default_factory=Counter)
    compressed_files: Counter[str] = field(default_factory=Counter)
    damaged_files: list[dict[str, Any]] = field(default_factory=list)
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    held_back: list[dict[str, Any]] = field(default_factory=list)  # ends of files still being written
    rewritten_files: list[dict[str, Any]] = field(default_factory=list)  # truncated in place since last read

    def merge(self, other: IngestReport) -> None:
        """Add another part of the same ingest (a file read in another process)."""
        for name, value in other.__dict__.items():
            if isinstance(value, list):
                getattr(self, name).extend(value)
            elif isinstance(value, Counter):
                getattr(self, name).update(value)
            elif isinstance(value, int):
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "dlq_reasons": dict(self.dlq_reasons),
            "compressed_files": dict(self.compressed_files),
            "damaged_files": [dict(d) for d in self.damaged_files],
            "skipped_files": [dict(s) for s in self.skipped_files],
            "held_back": [dict(h) for h in self.held_back],
            "rewritten_files": [dict(r) for r in self.rewritten_files],
        }


class _RawRow(NamedTuple):
    offset: int
    event: dict[str, Any]
    original_text: str | None  # set when the stored payload had to differ from the record
    duplicate_keys: bool = False  # the record held a key twice: the payload keeps the last, original_text all
    text: str | None = None  # the record's text, when it is the payload as it stands (jsonb reads it as Python did)


class _DeadLetter(NamedTuple):
    offset: int
    reason: str
    payload: Any
    metadata: dict[str, Any]
    priority: int
    classification: str


def _replace_nul(value: Any, by: str) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", by)
    if isinstance(value, dict):
        return {k: _replace_nul(v, by) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_nul(v, by) for v in value]
    return value


def _nul_in_keys(value: Any) -> bool:
    if isinstance(value, dict):
        return any("\x00" in k or _nul_in_keys(v) for k, v in value.items())
    return isinstance(value, list) and any(_nul_in_keys(v) for v in value)


def _sanitized_event(record: Record) -> tuple[dict[str, Any], bool] | None:
    """A valid event whose only fault is a ``\\u0000`` escape in a free-text value, which jsonb cannot store: the
    event without its NULs, its exact text kept beside it (``original_text``), so nothing is lost.

    Only where the NUL changes no meaning: never in a key (dropping it could merge two keys), and never in a value
    the catalogue checks (``cowrie.session.con\\u0000nect`` is no event id: with a placeholder where its NUL was,
    the event must still validate). Numbers are checked against numeric's limits while parsing. Returns the event
    and whether an object in it held a key twice.
    """
    duplicate_keys = False

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicate_keys
        value = dict(pairs)
        duplicate_keys |= len(value) != len(pairs)
        return value

    try:
        value = json.loads(
            record.raw.decode("utf-8"), parse_float=jsonutil.storable_number, parse_int=jsonutil.storable_number,
            object_pairs_hook=unique,
        )  # fmt: skip
        if not isinstance(value, dict) or _nul_in_keys(value) or not validate_event(_replace_nul(value, "\ufffd")):
            return None
        value = _replace_nul(value, "")
        jsonutil.loads(jsonutil.canonical_json(value))  # storable now, or still not (lone surrogates)
    except (ValueError, RecursionError):
        return None
    return (value, duplicate_keys) if validate_event(value) else None


def _wrap(raw: bytes) -> tuple[dict[str, str], str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        return {"raw_base64": base64.b64encode(raw).decode("ascii")}, "raw_base64"
    return {"raw_text": text}, "raw_text"


def route(record: Record) -> _RawRow | _DeadLetter:
    """Decide where one record goes, and with what."""
    if record.ok:
        result = validate_event(record.value)
        if result.valid:
            if record.duplicate_keys:
                return _RawRow(record.offset, record.value, record.raw.decode("utf-8"), duplicate_keys=True)
            return _RawRow(record.offset, record.value, None, text=record.raw.decode("utf-8"))
        if record.duplicate_keys:  # as jsonb it would lose a value: the record is kept as its text
            payload, form = _wrap(record.raw)
        else:
            payload, form = record.value, "json"
        reason, errors = VALIDATION_FAILED, list(result.errors)
    else:
        if record.error == NOT_STORABLE_JSON and (sanitized := _sanitized_event(record)) is not None:
            event, duplicate_keys = sanitized
            return _RawRow(record.offset, event, record.raw.decode("utf-8"), duplicate_keys)
        payload, form = _wrap(record.raw)
        reason, errors = record.error or "unknown", []
    priority, classification = classify_record(record, reason)
    metadata = {"payload_form": form, "record_bytes": len(record.raw), "errors": errors}
    if record.duplicate_keys:
        metadata["duplicate_keys"] = True
    return _DeadLetter(record.offset, reason, payload, metadata, priority, classification)


class _Event(NamedTuple):
    """A raw_events row as written: the payload as text (the record's own, else rendered), its parsed value let go.
    The server derives the checksum from the payload it stores (a generated column)."""

    offset: int
    eventid: str
    session: str | None
    src_ip: str | None
    timestamp: str  # validated ISO 8601 with its offset: the server reads it as Python does
    payload: str
    original_text: str | None
    duplicate_keys: bool


class _Letter(NamedTuple):
    """A dead_letter_events row as written."""

    offset: int
    reason: str
    payload: str
    checksum: str
    metadata: str
    priority: int
    classification: str
    duplicate_keys: bool


def _rendered(row: _RawRow | _DeadLetter) -> _Event | _Letter:
    if isinstance(row, _RawRow):
        event = row.event
        session = event.get("session")
        return _Event(row.offset, event["eventid"], session if isinstance(session, str) else None,
                      event.get("src_ip"), event["timestamp"],
                      jsonutil.canonical_json(event) if row.text is None else row.text,
                      row.original_text, row.duplicate_keys)  # fmt: skip
    return _Letter(row.offset, row.reason, *jsonutil.canonical_with_checksum(row.payload), json.dumps(row.metadata),
                   row.priority, row.classification, "duplicate_keys" in row.metadata)  # fmt: skip


def _insert_raw(conn: psycopg.Connection[Any], source: str, inode: str, rows: list[_Event]) -> int:
    """Insert events, skipping positions stored already, but for a partial event there (a cut record an earlier read
    stored as a dead letter, closed by repair): the whole record read since replaces it."""
    if not rows:
        return 0
    cur = conn.execute(
        """
        INSERT INTO raw_events (source, source_inode, source_offset, eventid, session, src_ip, event_timestamp,
                                payload, original_text, duplicate_keys)
        SELECT %(source)s, %(inode)s, r.off, r.eventid, r.session, r.src_ip::inet, r.ts::timestamptz,
               r.payload::jsonb, r.original, r.duplicate_keys
          FROM unnest(%(offsets)s::bigint[], %(eventids)s::text[], %(sessions)s::text[], %(ips)s::text[],
                      %(timestamps)s::text[], %(payloads)b::text[], %(originals)b::text[], %(duplicates)s::boolean[])
               AS r(off, eventid, session, src_ip, ts, payload, original, duplicate_keys)
        ON CONFLICT ON CONSTRAINT raw_events_source_position DO UPDATE
           SET eventid = EXCLUDED.eventid, session = EXCLUDED.session, src_ip = EXCLUDED.src_ip,
               event_timestamp = EXCLUDED.event_timestamp, payload = EXCLUDED.payload,
               original_text = EXCLUDED.original_text, duplicate_keys = EXCLUDED.duplicate_keys, partial = false,
               repair_strategy = NULL, ingested_at = now()
         WHERE raw_events.partial
        """,
        {"source": source, "inode": inode} | dict(zip(
            ("offsets", "eventids", "sessions", "ips", "timestamps", "payloads", "originals", "duplicates"),
            map(list, zip(*rows, strict=True)), strict=True)),
    )  # fmt: skip
    return cur.rowcount


def _insert_dead_letters(
    conn: psycopg.Connection[Any], source: str, inode: str, ingest_id: str, rows: list[_Letter]
) -> int:
    """Insert dead letters, skipping positions whose event is stored (the trigger skips known keys)."""
    if not rows:
        return 0
    columns = ("offsets", "reasons", "payloads", "checksums", "metadata", "priorities", "classifications", "_")
    cur = conn.execute(
        """
        INSERT INTO dead_letter_events (ingest_id, source, source_inode, source_offset, reason, payload,
                                        payload_checksum, metadata_json, priority, classification)
        SELECT %(ingest_id)s, %(source)s::text, %(inode)s::text, d.off, d.reason, d.payload::jsonb, d.checksum,
               d.metadata::jsonb, d.priority, d.classification
          FROM unnest(%(offsets)s::bigint[], %(reasons)s::text[], %(payloads)b::text[], %(checksums)s::text[],
                      %(metadata)b::text[], %(priorities)s::int[], %(classifications)s::text[])
               AS d(off, reason, payload, checksum, metadata, priority, classification)
         -- a position whose event is written already (repaired from an earlier read of this file): nothing new.
         -- The batch's own positions probed in the unique index (a NOT EXISTS anti-join is planned as a hash of
         -- every row of the source while its statistics are young: quadratic over a large file).
         WHERE d.off <> ALL (ARRAY(SELECT r.source_offset FROM raw_events r
                                    WHERE r.source = %(source)s::text AND r.source_inode = %(inode)s::text
                                      AND r.source_offset = ANY (%(offsets)s::bigint[])))
        """,
        {"ingest_id": ingest_id, "source": source, "inode": inode}
        | dict(zip(columns, map(list, zip(*rows, strict=True)), strict=True)),
    )
    return cur.rowcount


# COPY's text format: a backslash starts an escape, tab and newline end a field and a row. The text is sent as
# UTF-8 whatever the connection's client encoding (PGCLIENTENCODING, the URL): the statements say so.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL = "\\N"
_COPY_RAW = """
    COPY raw_events (source, source_inode, source_offset, eventid, session, src_ip, event_timestamp, payload,
                     original_text, duplicate_keys) FROM STDIN (ENCODING 'UTF8')
"""
_COPY_DEAD = """
    COPY dead_letter_events (ingest_id, source, source_inode, source_offset, reason, payload, payload_checksum,
                             metadata_json, priority, classification) FROM STDIN (ENCODING 'UTF8')
"""
# A COPY is written in pieces of this size: the server stores the first rows while the next are sent.
_COPY_PIECE = 1 << 16


def _copy_field(value: str | None) -> str:
    """A field in COPY text format. Most texts (a JSON line) hold no tab, newline or carriage return: then only
    backslashes need doubling, and ``replace`` and ``in`` scan in C where ``translate`` looks up every character."""
    if value is None:
        return _NULL
    if "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value.replace("\\", "\\\\")


def _event_line(prefix: str, e: _Event) -> str:
    """One raw_events row in COPY text format. Validation fixed the shape of eventid, session, src_ip and timestamp:
    no tab, newline or backslash in them."""
    return (
        f"{prefix}{e.offset}\t{e.eventid}\t{_NULL if e.session is None else e.session}"
        f"\t{_NULL if e.src_ip is None else e.src_ip}\t{e.timestamp}\t{_copy_field(e.payload)}"
        f"\t{_copy_field(e.original_text)}"
        f"\t{'t' if e.duplicate_keys else 'f'}\n"
    )


def _letter_line(prefix: str, d: _Letter) -> str:
    return (
        f"{prefix}{d.offset}\t{d.reason}\t{_copy_field(d.payload)}\t{d.checksum}\t{_copy_field(d.metadata)}"
        f"\t{d.priority}\t{d.classification}\n"
    )


def _copy(conn: psycopg.Connection[Any], statement: str, data: bytes) -> int:
    with conn.cursor() as cur:
        with cur.copy(statement) as copy, memoryview(data) as view:
            for start in range(0, len(view), _COPY_PIECE):
                copy.write(view[start : start + _COPY_PIECE])
        return cur.rowcount


def _unseen(conn: psycopg.Connection[Any], source: str, inode: str, first: int, last: int) -> bool:
    """No event of this file is stored between these offsets: the batch's rows can be copied in as they are."""
    query = """SELECT EXISTS (SELECT FROM raw_events
                               WHERE source = %s AND source_inode = %s AND source_offset BETWEEN %s AND %s)"""
    return not conn.execute(query, (source, inode, first, last)).fetchone()[0]


@dataclass
class _Batch:
    """Consecutive records routed and rendered, ready for the writer: each record is rendered as it is read and
    let go (a batch of parsed records, 3 MB of objects, costs 3.5 µs a record in cache misses alone)."""

    first: int
    last: int = 0
    records: int = 0
    boms: int = 0
    events: list[_Event] = field(default_factory=list)
    letters: list[_Letter] = field(default_factory=list)
    bytes_read: int = 0  # of the file, once the batch was read: for the progress callback
    event_copy: bytes = b""
    letter_copy: bytes = b""

    def add(self, record: Record) -> None:
        row = _rendered(route(record))
        (self.events if type(row) is _Event else self.letters).append(row)
        self.records += 1
        self.boms += record.bom
        self.last = record.offset

    def seal(self, source: str, inode: str, ingest_id: str) -> None:
        """The COPY text of the batch's rows (written by the writer thread, rendered here beside the reading)."""
        prefix = f"{_copy_field(source)}\t{inode}\t"
        self.event_copy = "".join([_event_line(prefix, e) for e in self.events]).encode("utf-8")
        prefix = f"{ingest_id}\t{prefix}"
        self.letter_copy = "".join([_letter_line(prefix, d) for d in self.letters]).encode("utf-8")


def _write(
    conn: psycopg.Connection[Any], source: str, inode: str, ingest_id: str, batch: _Batch, durable: bool
) -> tuple[int, int, int]:
    """Write one batch in one transaction: (events inserted, dead letters inserted, dead letters superseded).

    By COPY where no earlier read of the file reached (the insert trigger still keeps one dead letter per key),
    else by the insert path, which skips what is stored: also when another ingest of the same file stores one of
    the batch's events meanwhile (the COPY fails on its position, and its transaction is undone).

    A batch that is not ``durable`` commits without waiting for its WAL to reach disk: a file's last batch is
    durable, and its commit flushes the WAL of every batch before it (the log is one sequence)."""
    try:
        with conn.transaction():
            _flush_unless(durable, conn)
            if _unseen(conn, source, inode, batch.first, batch.last):
                superseded = _supersede(conn, source, inode, batch)
                raw = _copy(conn, _COPY_RAW, batch.event_copy) if batch.events else 0
                dead = _copy(conn, _COPY_DEAD, batch.letter_copy) if batch.letters else 0
                return raw, dead, superseded
    except psycopg.errors.UniqueViolation:
        pass
    with conn.transaction():
        _flush_unless(durable, conn)
        superseded = _supersede(conn, source, inode, batch)
        return (
            _insert_raw(conn, source, inode, batch.events),
            _insert_dead_letters(conn, source, inode, ingest_id, batch.letters),
            superseded,
        )


def _flush_unless(durable: bool, conn: psycopg.Connection[Any]) -> None:
    """Only a file's last batch waits for its WAL flush, and for all of them: the disk's flush latency, which no CPU
    hides, is paid once a file, not once a batch."""
    if not durable:
        conn.execute("SET LOCAL synchronous_commit = off")


def _supersede(conn: psycopg.Connection[Any], source: str, inode: str, batch: _Batch) -> int:
    """Resolve the dead letters an earlier read left where this one reads a whole event: a file left alone with a
    cut end (stored as a dead letter) that its writer completed later. The record is kept once, in raw_events; the
    cut read is resolved ``superseded``. Run before the batch stores its own dead letters, so that one index probe
    of the batch's range answers for almost every batch: no earlier read left a dead letter there."""
    if not batch.events:
        return 0
    probe = """SELECT EXISTS (SELECT FROM dead_letter_events WHERE source = %s AND source_offset BETWEEN %s AND %s
                                 AND NOT resolved AND source_inode = %s)"""
    if not conn.execute(probe, (source, batch.first, batch.last, inode)).fetchone()[0]:
        return 0
    return conn.execute(  # the range again, so the (source, source_offset) index drives it whatever the statistics
        """UPDATE dead_letter_events
              SET resolved = true, resolved_at = now(), resolution_method = 'superseded', last_processed_at = now(),
                  processing_lock = NULL, lock_expires_at = NULL
            WHERE source = %s AND source_offset BETWEEN %s AND %s AND source_offset = ANY (%s) AND NOT resolved
              AND source_inode = %s AND quarantined_at IS NULL""",
        (source, batch.first, batch.last, [e.offset for e in batch.events], inode),
    ).rowcount


def _count(report: IngestReport, batch: _Batch, raw_inserted: int, dlq_inserted: int, superseded: int) -> None:
    events, letters = batch.events, batch.letters
    report.records += batch.records
    report.raw_inserted += raw_inserted
    report.raw_duplicates += len(events) - raw_inserted
    report.dlq_inserted += dlq_inserted
    report.dlq_duplicates += len(letters) - dlq_inserted
    report.dlq_superseded += superseded
    report.sanitized += sum(1 for e in events if e.original_text is not None and not e.duplicate_keys)
    report.duplicate_keys += sum(1 for e in events if e.duplicate_keys) + sum(1 for d in letters if d.duplicate_keys)
    report.boms_skipped += batch.boms
    report.dlq_reasons.update(d.reason for d in letters)


# What one JSON value costs in memory once parsed and rendered (a Decimal, a slot, its canonical text), beyond its
# bytes: 8 MiB of ``0,0,0,...`` parses into 4 million Decimals, about 550 MB.
_VALUE_COST = 128


def _weight(record: Record) -> int:
    """The memory a record holds in a batch, estimated from its bytes and its values (a value per ``,`` or ``:``;
    nesting adds at most the reader's depth limit), so a batch of records that parse into many small values stays
    within the budget too. Ordinary Cowrie records weigh about 3-5 KiB."""
    raw = record.raw
    return len(raw) + _VALUE_COST * (raw.count(b",") + raw.count(b":"))


def _batches(records: Iterable[Record], size: int, budget: int) -> Iterator[_Batch]:
    """Batches of at most ``size`` records and ``budget`` of their weight, a heavier record alone in its batch."""
    batch: _Batch | None = None
    held = 0
    for record in records:
        weight = _weight(record)
        if batch is not None and held + weight > budget:
            yield batch
            batch = None
        if batch is None:
            batch, held = _Batch(record.offset), 0
        batch.add(record)
        held += weight
        if batch.records >= size:
            yield batch
            batch = None
    if batch is not None:
        yield batch


def _with_last(batches: Iterable[_Batch], stream: LogStream) -> Iterator[tuple[_Batch, bool]]:
    """Each batch with whether it is the file's last, known once the next is read (each stamped with the bytes
    read when it was whole, for progress)."""
    held: _Batch | None = None
    for batch in batches:
        batch.bytes_read = stream.bytes_read
        if held is not None:
            yield held, False
        held = batch
    if held is not None:
        yield held, True


_PROBE_PIECE = 1 << 20


def _corruption(path: Path) -> Damage | None:
    """The damage of a compressed file whose data turned out corrupt (not merely cut short), found by decoding it
    once to its end before anything is ingested: integrity checks sit at the end of each member."""
    with open_log(path) as probe:
        if probe.compression is None:
            return None
        while probe.read(_PROBE_PIECE):
            pass
        damage = probe.damage
    return damage if damage is not None and damage.reason == COMPRESSED_CORRUPT else None


class _Prefix(io.RawIOBase):
    """The first ``size`` bytes of a stream."""

    def __init__(self, stream: LogStream, size: int) -> None:
        super().__init__()
        self.stream, self.left = stream, size

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.left
        data = self.stream.read(min(size, self.left)) if self.left else b""
        self.left -= len(data)
        return data


def is_event(value: Any) -> bool:
    """What a whole record is, for the reader to split a cut record from a whole one written after it."""
    return validate_event(value).valid


def is_cut_record(head: bytes) -> bool:
    """A JSON record cut short where no value was due: what follows it cannot be one of its values, nor a string
    of some other producer's text (a Python repr keeps ``"`` unescaped in its strings)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if text.rstrip(" \t\r\n").endswith((":", ",", "[", "{")):
        return False
    return tokenizer_fix(text)[1] in (None, TRUNCATED_VALUE)


def _tail_letter(stream: LogStream, damage: Damage) -> tuple[_DeadLetter, int]:
    """The undecodable rest of a damaged compressed file as one dead letter, and the tail's full length.

    It sits at the decompressed offset where the good data ends, so ingesting the file again finds the same
    key. It has no ``record_bytes``: it spans no bytes of the decompressed stream, so fragment stitching never
    takes it for a neighbour.
    """
    tail = stream.tail(MAX_TAIL_BYTES)
    metadata = {
        "payload_form": "raw_base64",
        "compression": damage.compression,
        "compressed_offset": damage.compressed_offset,
        "detected_at": damage.detected_at,
        "unverified_from": damage.unverified_from,
        "tail_bytes": tail.size,
        "tail_sha256": tail.sha256,
        "stored_bytes": len(tail.data),
        "tail_capped": tail.capped,  # only the first stored_bytes of the tail are in the payload
        "message": damage.message,
    }
    payload = {"raw_base64": base64.b64encode(tail.data).decode("ascii")}
    letter = _DeadLetter(damage.decompressed_offset, damage.reason, payload, metadata, TAIL_PRIORITY,
                         TAIL_CLASSIFICATION)  # fmt: skip
    return letter, tail.size


def _written(
    report: IngestReport,
    batch: _Batch,
    write: Future[tuple[int, int, int]],
    reported: int,
    on_batch: Callable[[int], None] | None,
) -> int:
    """Wait for a batch's commit (its error raised here), count it, report progress; returns the bytes reported."""
    _count(report, batch, *write.result())
    if on_batch:
        on_batch(batch.bytes_read - reported)
    return batch.bytes_read


# How much of a file's start, and of its bytes before the end read last, is kept to know it again: a Cowrie log's
# line alone (its timestamp to the microsecond) tells one generation of a file from the next.
HEAD_BYTES = 4096


def _file_key(conn: psycopg.Connection[Any], source: str, fd: int, report: IngestReport) -> str:
    """The key of the file's positions (``source_inode``): its inode, and from its second generation on
    ``<inode>.<generation>``.

    A file truncated in place and written again (logrotate's copytruncate) keeps its inode and reuses byte offsets,
    so its positions need another key. It is known by its first bytes or the bytes just before the end seen last
    differing from the ones read then (a cut back to a shorter prefix, appended to past the old end), or by a size
    below the one seen before. A file that only grew keeps both, and its key. The file is looked at while its row
    is locked, so two ingests of a growing file see it grow in the order they record it."""
    inode = str(os.fstat(fd).st_ino)
    with conn.transaction():
        conn.execute(
            """INSERT INTO dlq_source_files (source, inode, head, size) VALUES (%s, %s, '', 0)
               ON CONFLICT (source, inode) DO NOTHING""",
            (source, inode),
        )
        generation, known_head, known_tail, known_size = conn.execute(
            "SELECT generation, head, tail, size FROM dlq_source_files WHERE source = %s AND inode = %s FOR UPDATE",
            (source, inode),
        ).fetchone()
        size = os.fstat(fd).st_size
        head = os.pread(fd, min(HEAD_BYTES, size), 0)
        tail = os.pread(fd, min(HEAD_BYTES, size), size - min(HEAD_BYTES, size))
        changed: list[str] = []
        if size < known_size:
            changed.append("smaller")
        if not head.startswith(known_head):
            changed.append("first bytes differ")
        if size >= known_size and os.pread(fd, len(known_tail), known_size - len(known_tail)) != known_tail:
            changed.append("bytes before the end read last differ")
        if changed:
            generation += 1
            report.rewritten_files.append(
                {"path": source, "inode": inode, "generation": generation, "size_before": known_size, "size": size,
                 "why": changed}
            )  # fmt: skip
        conn.execute(
            """UPDATE dlq_source_files
                  SET generation = %s, head = %s, tail = %s, size = %s, seen_at = now(),
                      generation_started_at = CASE WHEN %s THEN now() ELSE generation_started_at END
                WHERE source = %s AND inode = %s""",
            (generation, head, tail, size, bool(changed), source, inode),
        )
    return inode if generation == 1 else f"{inode}.{generation}"


# A file changed within this many seconds may still be being written: the end of it that is not whole yet (a last
# record without its newline, a compressed stream cut short) is left for a later ingest, which reads it at the same
# offset once whole. Only whole lines of a live file are shipped (Filebeat's rule); a file left alone this long is
# finished, and its cut end is a dead letter like any other.
BEING_WRITTEN_SECONDS = 300


def _being_written(stream: LogStream) -> bool:
    return time.time() - os.fstat(stream.fileno()).st_mtime < BEING_WRITTEN_SECONDS


def _held_back(report: IngestReport, source: str, offset: int, size: int, why: str) -> None:
    report.held_back.append({"path": source, "offset": offset, "bytes": size, "reason": why})


def _unless_being_written(
    records: Iterator[Record], stream: LogStream, source: str, report: IngestReport
) -> Iterator[Record]:
    """Every record, but a failed last one cut where the data ends (a plain file without its last newline or with a
    record of several lines still open at its end, compressed data cut short) while the file is being written."""
    last = None
    for record in records:
        if last is not None:
            yield last
        last = record
    if last is None:
        return
    if stream.compression:
        cut = stream.damage is not None and stream.damage.reason == COMPRESSED_TRUNCATED
    else:  # no newline at the end, or a record of several lines still open there (pretty-printed, cut after a line)
        open_lines = last.error == TRUNCATED and b"\n" in last.raw
        cut = open_lines or os.pread(stream.fileno(), 1, stream.bytes_read - 1) != b"\n"
    if last.ok or not cut or not _being_written(stream):
        yield last
    else:
        _held_back(report, source, last.offset, len(last.raw), "its last record is cut where the data ends")


# How long the reading thread may hold the GIL while the writer thread, its answer from the server in, waits for
# it. At Python's 5 ms a batch's round trips (transaction, check, two COPYs, commit) cost more than its rows.
_WRITER_SWITCH_SECONDS = 0.0005


@contextmanager
def _writer_thread() -> Iterator[ThreadPoolExecutor]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, _WRITER_SWITCH_SECONDS))
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="dlq-ingest-writer") as writer:
            yield writer
    finally:
        sys.setswitchinterval(previous)


def ingest_file(
    conn: psycopg.Connection[Any],
    path: str | os.PathLike[str],
    report: IngestReport,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Ingest one file (plain or compressed) into the database ``conn`` points at, committing batch by batch.

    A batch ends at ``batch_size`` records or before ``batch_bytes`` of their weight, whichever comes first.

    ``on_batch`` gets the number of bytes of the file (as stored on disk: compressed bytes for a compressed
    file) read since its last call; over the whole file they add up to the file's size.
    """
    path = Path(path).resolve()
    source = str(path)
    if not _utf8(source):  # a file name in another encoding: no text column can name it
        raise ValueError(f"cannot ingest {source!r}: its path is not valid UTF-8")
    if len(source) > MAX_SOURCE_CHARACTERS:
        raise ValueError(
            f"cannot ingest {source[:80]!r}...: its path is longer than {MAX_SOURCE_CHARACTERS} characters"
        )
    reported = 0
    corrupt = _corruption(path)
    with open_log(path) as stream:
        opened = os.fstat(stream.fileno())  # of the file opened, even if the path changed since
        inode = _file_key(conn, source, stream.fileno(), report)
        data: LogStream | _Prefix = stream
        if corrupt is not None:
            # Data of a corrupt member is read only up to where the member starts: its checksum failed, so the bytes
            # decoded from it may be wrong, and the member's compressed bytes go to the tail's dead letter instead.
            data = _Prefix(stream, corrupt.unverified_from)
        elif not stream.compression:
            # A plain file is read up to its size when opened: what a writer appends meanwhile is the next ingest's,
            # so the end read is the end the rule for a file being written looks at (not a momentary one).
            data = _Prefix(stream, opened.st_size)
        records = read_records(data, accept=is_event, is_cut=is_cut_record)
        records = _unless_being_written(records, stream, source, report)
        # One batch is written (a thread, waiting on the server) while the next is read; the last is written
        # durable. A batch is rendered as COPY text once the batch before it is written, so one batch at a time is
        # held twice (as rows and as text).
        with _writer_thread() as writer:
            writing: tuple[_Batch, Future[tuple[int, int, int]]] | None = None
            for batch, last in _with_last(_batches(records, batch_size, batch_bytes), stream):
                if writing is not None:
                    reported = _written(report, *writing, reported, on_batch)
                    writing = None
                batch.seal(source, inode, report.ingest_id)
                writing = batch, writer.submit(_write, conn, source, inode, report.ingest_id, batch, last)
            if writing is not None:
                reported = _written(report, *writing, reported, on_batch)
        if stream.compression:
            report.compressed_files[stream.compression] += 1
        if corrupt is not None:
            stream.damage = replace(
                corrupt, decompressed_offset=corrupt.unverified_from, compressed_offset=corrupt.unit_offset
            )
        if (damage := stream.damage) is not None and damage.reason == COMPRESSED_TRUNCATED and _being_written(stream):
            if not report.held_back or report.held_back[-1]["path"] != source:  # the data ends between records
                _held_back(report, source, damage.decompressed_offset, 0, "its compressed data is cut short")
        elif damage is not None:
            letter, tail_bytes = _tail_letter(stream, damage)
            with conn.transaction():
                inserted = _insert_dead_letters(conn, source, inode, report.ingest_id, [_rendered(letter)])
            report.dlq_inserted += inserted
            report.dlq_duplicates += 1 - inserted
            report.dlq_reasons[letter.reason] += 1
            report.damaged_files.append(
                {"path": source, "compression": damage.compression, "reason": damage.reason,
                 "message": damage.message, "decompressed_offset": damage.decompressed_offset,
                 "compressed_offset": damage.compressed_offset, "tail_bytes": tail_bytes}
            )  # fmt: skip
        if on_batch and stream.bytes_read > reported:
            on_batch(stream.bytes_read - reported)
    report.files += 1


def ingest_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    url: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    workers: int = 1,
) -> IngestReport:
    """Ingest Cowrie logs (files, or directories of them: see :func:`expand_paths`) and report what went where.

    ``workers`` > 1 ingests that many files at a time, each in a process of its own with its own connection
    (largest files first); a file is always read by one process, in order. There a file that fails stops no other:
    the first error is raised once every file has finished. With one worker the first failure stops the ingest
    (the files before it are ingested, the ones after it are not)."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    report = IngestReport(ingest_id=uuid.uuid4().hex)
    files, report.skipped_files = expand_paths(paths)
    url = database_url(url)
    with _connect(url) as conn:
        if conn.execute("SELECT to_regclass('dead_letter_events')").fetchone() == (None,):
            raise RuntimeError("the DLQ schema is missing from this database: run `dlq create` first")
        if workers == 1 or len(files) < 2:
            for path in files:
                ingest_file(conn, path, report, batch_size=batch_size, on_batch=on_batch)
            return report
    _ingest_in_processes(url, files, report, batch_size, on_batch, workers)
    return report


def _connect(url: str) -> psycopg.Connection[Any]:
    """Ingest talks UTF-8 whatever the client encoding says (PGCLIENTENCODING, the URL): records and paths hold any
    character, and LATIN1 would refuse a ✓ on the insert path."""
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SET client_encoding = 'UTF8'")
    return conn


_progress: Any = None  # a worker process's queue of bytes read, for the parent's on_batch


def _start_worker(progress: Any) -> None:
    global _progress
    _progress = progress
    _end_with_parent()


def _end_with_parent() -> None:
    """A worker whose parent is killed gets SIGTERM (Linux's parent-death signal): it ends its batch's transaction
    undone rather than go on ingesting, then wait for work forever, under init."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker outlives a killed parent
        return
    if os.getppid() == 1:  # the parent died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


def _ingest_one(url: str, path: Path, ingest_id: str, batch_size: int) -> IngestReport:
    report = IngestReport(ingest_id=ingest_id)
    with _connect(url) as conn:
        ingest_file(conn, path, report, batch_size=batch_size, on_batch=_progress.put if _progress else None)
    return report


def _ingest_in_processes(
    url: str,
    files: list[Path],
    report: IngestReport,
    batch_size: int,
    on_batch: Callable[[int], None] | None,
    workers: int,
) -> None:
    from dlq_assets.core.processing.pool import start_method

    context = multiprocessing.get_context(start_method())
    progress = context.Queue() if on_batch else None
    order = sorted(range(len(files)), key=lambda i: -files[i].stat().st_size)  # the longest start first
    with ProcessPoolExecutor(
        min(workers, len(files)), mp_context=context, initializer=_start_worker, initargs=(progress,)
    ) as pool:
        futures = {i: pool.submit(_ingest_one, url, files[i], report.ingest_id, batch_size) for i in order}
        pending = set(futures.values())
        while pending:
            _, pending = wait(pending, timeout=0.2)
            while progress is not None and on_batch is not None and not progress.empty():
                on_batch(progress.get())
    while progress is not None and on_batch is not None and not progress.empty():
        on_batch(progress.get())
    errors = [futures[i].exception() for i in range(len(files)) if futures[i].exception() is not None]
    for i in range(len(files)):  # in the order the files were named, as one process would report them
        if futures[i].exception() is None:
            report.merge(futures[i].result())
    if errors:
        raise errors[0]


_SYMLINK_REASON = (  # by whether it leads anywhere, and to a directory
    "a broken symbolic link",
    "a symbolic link to a file (not followed in a directory: name it to read it)",
    "a symbolic link to a directory (not followed)",
)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[dict[str, str]]]:
    """The files to ingest, and the directory entries left out with why.

    A file named in ``paths`` is always read, whatever its name. A directory is walked recursively, in sorted
    path order, taking the regular files whose names match ``LOG_NAME``: ``cowrie.json``, its rotated forms
    ``cowrie.json.YYYY-MM-DD`` and ``cowrie.json.N``, any ``*.json`` or ``*.jsonl``, each also with ``.gz``,
    ``.bz2``, ``.xz`` or ``.zst``. Everything else in it is listed as skipped.
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            for path in sorted(entry.rglob("*")):
                if not _utf8(str(path)):
                    skipped.append({"path": str(path), "reason": "name is not valid UTF-8: no text column holds it"})
                elif len(str(path.resolve())) > MAX_SOURCE_CHARACTERS:
                    skipped.append(
                        {"path": str(path), "reason": f"path longer than {MAX_SOURCE_CHARACTERS} characters"}
                    )
                elif path.is_symlink():  # it may point anywhere (/etc/passwd): a file named on its own is read
                    skipped.append({"path": str(path), "reason": _SYMLINK_REASON[path.exists() + path.is_dir()]})
                elif path.is_dir():
                    pass
                elif not path.is_file():
                    skipped.append({"path": str(path), "reason": "not a regular file"})
                elif LOG_NAME.fullmatch(path.name):
                    files.append(path)
                else:
                    skipped.append({"path": str(path), "reason": "name is not a Cowrie JSON log's"})
        elif entry.is_file():
            files.append(entry)
        elif entry.exists():
            raise ValueError(f"cannot ingest {entry}: not a regular file or a directory")
        else:
            raise FileNotFoundError(f"no such file or directory: {entry}")
    return files, skipped
