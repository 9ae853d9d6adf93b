"""Ingest Cowrie JSON logs: valid events to ``raw_events``, everything else to the DLQ, nothing lost.

Every record the reader yields ends in exactly one place: a ``raw_events`` row (idempotent on source, inode
and byte offset) or a ``dead_letter_events`` row (idempotent on its key). Records jsonb cannot hold are
wrapped losslessly: ``{"raw_text": ...}`` for UTF-8 text, ``{"raw_base64": ...}`` for bytes that are not.
Each batch commits on its own, so an interrupted ingest resumes by simply running again.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from dlq_assets import jsonutil
from dlq_assets.classify import classify_record
from dlq_assets.cowrie import validate_event
from dlq_assets.db import database_url
from dlq_assets.reader import NOT_STORABLE_JSON, Record, read_file

VALIDATION_FAILED = "validation_failed"
DEFAULT_BATCH_SIZE = 1000


@dataclass
class IngestReport:
    ingest_id: str
    files: int = 0
    records: int = 0
    raw_inserted: int = 0
    raw_duplicates: int = 0
    dlq_inserted: int = 0
    dlq_duplicates: int = 0
    sanitized: int = 0
    dlq_reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "dlq_reasons": dict(self.dlq_reasons)}


@dataclass(frozen=True)
class _RawRow:
    offset: int
    event: dict[str, Any]
    original_text: str | None  # set when the stored payload had to differ from the record


@dataclass(frozen=True)
class _DeadLetter:
    offset: int
    reason: str
    payload: Any
    metadata: dict[str, Any]
    priority: int
    classification: str


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


def _sanitized_event(record: Record) -> dict[str, Any] | None:
    """A valid event whose only fault is a ``\\u0000`` escape jsonb cannot store: the event without NULs.

    The record's exact text is kept beside it (``original_text``), so nothing is lost.
    """
    try:
        value = json.loads(record.raw.decode("utf-8"), parse_float=Decimal, parse_int=Decimal)
        value = _strip_nul(value)
        jsonutil.loads(jsonutil.canonical_json(value))  # storable now, or still not (lone surrogates)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) and validate_event(value) else None


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
            return _RawRow(record.offset, record.value, None)
        payload, form, reason, errors = record.value, "json", VALIDATION_FAILED, list(result.errors)
    else:
        if record.error == NOT_STORABLE_JSON and (event := _sanitized_event(record)) is not None:
            return _RawRow(record.offset, event, record.raw.decode("utf-8"))
        payload, form = _wrap(record.raw)
        reason, errors = record.error or "unknown", []
    priority, classification = classify_record(record, reason)
    metadata = {"payload_form": form, "record_bytes": len(record.raw), "errors": errors}
    return _DeadLetter(record.offset, reason, payload, metadata, priority, classification)


def _session(event: dict[str, Any]) -> str | None:
    value = event.get("session")
    return value if isinstance(value, str) else None


def _timestamp(event: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(event["timestamp"])
    except (KeyError, TypeError, ValueError):
        return None


def _insert_raw(conn: psycopg.Connection[Any], source: str, inode: str, rows: list[_RawRow]) -> int:
    if not rows:
        return 0
    payloads, checksums = zip(*(jsonutil.canonical_with_checksum(r.event) for r in rows), strict=True)
    cur = conn.execute(
        """
        INSERT INTO raw_events (source, source_inode, source_offset, eventid, session, src_ip, event_timestamp,
                                payload, payload_checksum, original_text)
        SELECT %(source)s, %(inode)s, r.off, r.eventid, r.session, r.src_ip::inet, r.ts,
               r.payload::jsonb, r.checksum, r.original
          FROM unnest(%(offsets)s::bigint[], %(eventids)s::text[], %(sessions)s::text[], %(ips)s::text[],
                      %(timestamps)s::timestamptz[], %(payloads)s::text[], %(checksums)s::text[], %(originals)s::text[])
               AS r(off, eventid, session, src_ip, ts, payload, checksum, original)
        ON CONFLICT ON CONSTRAINT raw_events_source_position DO NOTHING
        """,
        {
            "source": source,
            "inode": inode,
            "offsets": [r.offset for r in rows],
            "eventids": [r.event["eventid"] for r in rows],
            "sessions": [_session(r.event) for r in rows],
            "ips": [r.event.get("src_ip") for r in rows],
            "timestamps": [_timestamp(r.event) for r in rows],
            "payloads": list(payloads),
            "checksums": list(checksums),
            "originals": [r.original_text for r in rows],
        },
    )
    return cur.rowcount


def _insert_dead_letters(
    conn: psycopg.Connection[Any], source: str, inode: str, ingest_id: str, rows: list[_DeadLetter]
) -> int:
    if not rows:
        return 0
    payloads, checksums = zip(*(jsonutil.canonical_with_checksum(d.payload) for d in rows), strict=True)
    cur = conn.execute(
        """
        INSERT INTO dead_letter_events (ingest_id, source, source_inode, source_offset, reason, payload,
                                        payload_checksum, metadata_json, priority, classification)
        SELECT %(ingest_id)s, %(source)s, %(inode)s, d.off, d.reason, d.payload::jsonb, d.checksum,
               d.metadata::jsonb, d.priority, d.classification
          FROM unnest(%(offsets)s::bigint[], %(reasons)s::text[], %(payloads)s::text[], %(checksums)s::text[],
                      %(metadata)s::text[], %(priorities)s::int[], %(classifications)s::text[])
               AS d(off, reason, payload, checksum, metadata, priority, classification)
        """,
        {
            "ingest_id": ingest_id,
            "source": source,
            "inode": inode,
            "offsets": [d.offset for d in rows],
            "reasons": [d.reason for d in rows],
            "payloads": list(payloads),
            "checksums": list(checksums),
            "metadata": [json.dumps(d.metadata) for d in rows],
            "priorities": [d.priority for d in rows],
            "classifications": [d.classification for d in rows],
        },
    )
    return cur.rowcount


def _batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest_file(
    conn: psycopg.Connection[Any],
    path: str | os.PathLike[str],
    report: IngestReport,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Ingest one file into the database ``conn`` points at, committing batch by batch."""
    path = Path(path).resolve()
    source, inode = str(path), str(path.stat().st_ino)
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:  # a file name in another encoding: no text column can name it
        raise ValueError(f"cannot ingest {source!r}: its path is not valid UTF-8") from None
    for batch in _batches(read_file(path), batch_size):
        routed = [route(record) for record in batch]
        raw = [r for r in routed if isinstance(r, _RawRow)]
        dead = [r for r in routed if isinstance(r, _DeadLetter)]
        with conn.transaction():
            raw_inserted = _insert_raw(conn, source, inode, raw)
            dlq_inserted = _insert_dead_letters(conn, source, inode, report.ingest_id, dead)
        report.records += len(batch)
        report.raw_inserted += raw_inserted
        report.raw_duplicates += len(raw) - raw_inserted
        report.dlq_inserted += dlq_inserted
        report.dlq_duplicates += len(dead) - dlq_inserted
        report.sanitized += sum(1 for r in raw if r.original_text is not None)
        report.dlq_reasons.update(d.reason for d in dead)
        if on_batch:
            on_batch(sum(len(r.raw) for r in batch))
    report.files += 1


def ingest_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    url: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> IngestReport:
    """Ingest Cowrie logs (files, or directories of ``*.json*`` files) and report what went where."""
    report = IngestReport(ingest_id=uuid.uuid4().hex)
    files = list(_expand(paths))
    with psycopg.connect(database_url(url), autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('dead_letter_events')").fetchone() == (None,):
            raise RuntimeError("the DLQ schema is missing from this database: run `dlq create` first")
        for path in files:
            ingest_file(conn, path, report, batch_size=batch_size, on_batch=on_batch)
    return report


def _expand(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    for entry in map(Path, paths):
        if entry.is_dir():
            yield from sorted(p for p in entry.rglob("*.json*") if p.is_file())
        elif entry.is_file():
            yield entry
        else:
            raise FileNotFoundError(f"no such file or directory: {entry}")
