"""Intake end to end (`dlq ingest`: reader, validation, routing, writes) against a COPY of the same rows.

    python -m benchmarks.ingest --records 100000 --json

It writes a Cowrie log with the generator's damage (every kind, ``--damage`` of the records) as two files, one
plain and one gzip-compressed, then ingests them in a child process (`ingest_paths`, what `dlq ingest` runs; timed
from its first read to its last commit, the interpreter's start-up outside) and verifies every record the reader
finds in either file: in exactly one place (raw_events or dead_letter_events), byte-exact (a dead letter's stored
text or bytes equal the record's; an event's stored payload hashes, in PostgreSQL, to the record's parsed value).
The ceiling: the rows ingest wrote, dumped with COPY, the tables emptied, and the same rows loaded back by binary
COPY into the same tables (their indexes and triggers included) in this process. Repeats alternate which goes first.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.throughput import DERIVED_COLUMNS, _superuser, database
from dlq_assets.core import jsonutil
from dlq_assets.core.intake.compressed import open_log
from dlq_assets.core.intake.ingest import _RawRow, is_cut_record, is_event, route
from dlq_assets.core.intake.reader import Record, read_records

# raw_events' columns but payload_checksum, which the table generates
RAW_COLUMNS = ("source", "source_inode", "source_offset", "eventid", "session", "src_ip", "event_timestamp",
               "payload", "original_text", "duplicate_keys")  # fmt: skip
DLQ_COLUMNS = ("ingest_id", "source", "source_inode", "source_offset", "reason", "payload", "payload_checksum",
               "metadata_json", "priority", "classification")  # fmt: skip
TABLES = ("raw_events", "dead_letter_events", "dlq_poison_events", "dlq_idempotency_keys")


def write_logs(folder: Path, records: int, damage: float, seed: int) -> list[Path]:
    """Half the records in a plain file, half in a gzip-compressed one (rotated logs are compressed)."""
    from dlq_assets.devtools.generator import write_corrupted_log

    plain, rotated = folder / "cowrie.json", folder / "cowrie.json.1"
    write_corrupted_log(plain, n_events=records - records // 2, seed=seed, corruption_rate=damage)
    write_corrupted_log(rotated, n_events=records // 2, seed=seed + 1, corruption_rate=damage)
    with rotated.open("rb") as source, gzip.open(folder / "cowrie.json.1.gz", "wb", compresslevel=6) as target:
        shutil.copyfileobj(source, target, 1 << 20)
    rotated.unlink()
    return [plain, folder / "cowrie.json.1.gz"]


def child(url: str, paths: list[str], workers: int) -> dict[str, Any]:
    """One ingest in this process, everything imported first: its seconds, its report and its peak memory (of this
    process and, with workers, the largest of theirs)."""
    import resource

    from dlq_assets.core.intake.ingest import ingest_paths
    from dlq_assets.core.processing.report import peak_rss_mb

    started = time.perf_counter()
    report = ingest_paths(paths, url=url, workers=workers)
    seconds = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "report": report.as_dict(), "peak_rss_mb": round(max(peak_rss_mb(), children), 1)}


def run_ingest(url: str, paths: list[Path], workers: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.ingest", "--child", "--database-url", url, "--workers", str(workers),
               *map(str, paths)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"ingest failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verify(conn: psycopg.Connection[Any], paths: list[Path]) -> dict[str, Any]:
    """Every record the reader finds in exactly one place, byte-exact, as ingest routes it; no row for anything
    else."""
    records = wrong = 0
    examples: list[str] = []
    for path in paths:
        rows = _stored(conn, str(path.resolve()), str(path.stat().st_ino))
        row = next(rows, None)
        with open_log(path) as stream:
            for record in read_records(stream, accept=is_event, is_cut=is_cut_record):
                records += 1
                stored = []
                while row is not None and row[0] < record.offset:  # a row at no record's offset
                    wrong += 1
                    examples.append(f"{path.name}@{row[0]}: a row with no record")
                    row = next(rows, None)
                while row is not None and row[0] == record.offset:
                    stored.append(row)
                    row = next(rows, None)
                if problem := _mismatch(record, stored):
                    wrong += 1
                    if len(examples) < 10:
                        examples.append(f"{path.name}@{record.offset}: {problem}")
        while row is not None:
            wrong += 1
            examples.append(f"{path.name}@{row[0]}: a row past the last record")
            row = next(rows, None)
    return {"records": records, "wrong": wrong, "examples": examples[:10], "all_records_correct": wrong == 0}


def _stored(conn: psycopg.Connection[Any], source: str, inode: str) -> Iterator[tuple[Any, ...]]:
    """(offset, table, payload form, text, checksum recomputed by PostgreSQL, how the row was written) of every row
    of ``source``, by offset. An event's row: its derived columns as its payload says, written by ingest (not partial,
    no repair, no dead letter), under the file's key, and whether it marks duplicate keys; a dead letter's: its
    reason, priority, classification and length on record, pending as ingest leaves it, under the file's key.
    A server-side cursor: a million rows are streamed, never held."""
    query = f"""
        SELECT r.source_offset, 'raw', NULL, r.original_text, dlq_payload_checksum(x),
               jsonb_build_array({DERIVED_COLUMNS}
                   AND NOT r.partial AND r.repair_strategy IS NULL AND r.dlq_event_id IS NULL
                   AND r.source_inode = %(inode)s, r.duplicate_keys)
          FROM raw_events r CROSS JOIN LATERAL (SELECT r.payload) AS p(x) WHERE r.source = %(source)s
        UNION ALL
        SELECT source_offset, 'dlq', metadata_json ->> 'payload_form',
               coalesce(payload ->> 'raw_text', payload ->> 'raw_base64'), dlq_payload_checksum(payload),
               jsonb_build_array(reason, priority, classification, (metadata_json ->> 'record_bytes')::bigint,
                   NOT resolved AND resolved_at IS NULL AND resolution_method IS NULL AND retry_count = 0
                   AND quarantined_at IS NULL AND processing_lock IS NULL AND error_history = '[]'
                   AND source_inode = %(inode)s)
          FROM dead_letter_events WHERE source = %(source)s
        ORDER BY 1
    """
    with conn.transaction(), conn.cursor(name="stored") as cur:
        cur.itersize = 5000
        cur.execute(query, {"source": source, "inode": inode})
        yield from cur


def _mismatch(record: Record, stored: list[tuple[Any, ...]]) -> str | None:
    if len(stored) != 1:
        return f"in {len(stored)} places"
    _, table, form, text, checksum, written = stored[0]
    routed = route(record)
    if table == "raw":
        if not isinstance(routed, _RawRow):
            return "an event row for a record ingest sends to the DLQ"
        if written != [True, routed.duplicate_keys]:
            return f"event row written as {written}: derived columns, provenance, key or duplicate_keys wrong"
    else:
        if isinstance(routed, _RawRow):
            return "a dead letter for a record ingest stores as an event"
        expected = [routed.reason, routed.priority, routed.classification, len(record.raw), True]
        if written != expected:
            return f"dead letter written as {written}, expected {expected}"
    if table == "raw" and text is not None:  # kept as its text beside the payload (duplicate keys, NUL dropped)
        return None if text.encode("utf-8") == record.raw else "original_text differs"
    if form == "raw_text":
        return None if text.encode("utf-8") == record.raw else "raw_text differs"
    if form == "raw_base64":
        return None if base64.b64decode(text) == record.raw else "raw_base64 differs"
    value = routed.event if isinstance(routed, _RawRow) else routed.payload
    return None if checksum == jsonutil.canonical_with_checksum(value)[1] else f"{table} payload differs"


def dump(conn: psycopg.Connection[Any], folder: Path) -> dict[str, Path]:
    files = {}
    for table, columns in (("raw_events", RAW_COLUMNS), ("dead_letter_events", DLQ_COLUMNS)):
        files[table] = folder / f"{table}.copy"
        query = sql.SQL("COPY (SELECT {} FROM {} ORDER BY id) TO STDOUT (FORMAT binary)").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table)
        )
        with files[table].open("wb") as out, conn.cursor().copy(query) as copy:
            for block in copy:
                out.write(block)
    return files


def run_ceiling(conn: psycopg.Connection[Any], files: dict[str, Path]) -> float:
    """Seconds to COPY the dumped rows back into the emptied tables, in one transaction each, as ingest commits."""
    empty(conn)
    started = time.perf_counter()
    for table, columns in (("raw_events", RAW_COLUMNS), ("dead_letter_events", DLQ_COLUMNS)):
        query = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with conn.transaction(), conn.cursor().copy(query) as copy, files[table].open("rb") as source:
            while block := source.read(1 << 20):
                copy.write(block)
    return time.perf_counter() - started


def empty(conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.SQL(", ").join(map(sql.Identifier, TABLES))))
    conn.execute("SELECT dlq_recount_events()")
    conn.execute("VACUUM ANALYZE raw_events, dead_letter_events, dlq_idempotency_keys")
    if _superuser(conn):
        conn.execute("CHECKPOINT")  # each timed run starts without the last one's dirty pages to write


def benchmark(url: str, *, records: int, damage: float, seed: int, repeat: int, workers: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dlq-ingest-") as tmp, psycopg.connect(url, autocommit=True) as conn:
        folder = Path(tmp)
        busy = "SELECT EXISTS (SELECT 1 FROM raw_events) OR EXISTS (SELECT 1 FROM dead_letter_events)"
        if conn.execute(busy).fetchone()[0]:
            raise SystemExit("this database already holds events: the benchmark needs an empty one")
        paths = write_logs(folder, records, damage, seed)
        input_bytes = sum(_decompressed_size(p) for p in paths)
        file_bytes = sum(p.stat().st_size for p in paths)
        runs, files = [], None
        try:
            for n in range(repeat):
                ceiling = None
                if n % 2 == 1 and files:
                    ceiling = run_ceiling(conn, files)
                empty(conn)
                ingest = run_ingest(url, paths, workers)
                checked = verify(conn, paths)
                files = files or dump(conn, folder)
                if ceiling is None:
                    ceiling = run_ceiling(conn, files)
                runs.append({"ingest": ingest, "checked": checked, "ceiling_seconds": ceiling})
        finally:
            empty(conn)
        version = conn.execute("SHOW server_version").fetchone()[0]
    reader_records = runs[0]["checked"]["records"]
    rates = [reader_records / r["ingest"]["seconds"] for r in runs]
    ceilings = [reader_records / r["ceiling_seconds"] for r in runs]
    report = runs[-1]["ingest"]["report"]
    return {
        "records": reader_records,
        "records_per_s": round(statistics.median(rates), 1),
        "mb_per_s": round(input_bytes / 1e6 / statistics.median(r["ingest"]["seconds"] for r in runs), 2),
        "ceiling_records_per_s": round(statistics.median(ceilings), 1),
        "ratio": round(statistics.median(a / b for a, b in zip(rates, ceilings, strict=True)), 3),
        "ratios": [round(a / b, 3) for a, b in zip(rates, ceilings, strict=True)],
        "peak_rss_mb": max(r["ingest"]["peak_rss_mb"] for r in runs),
        "all_records_correct": all(r["checked"]["all_records_correct"] for r in runs),
        "wrong": [r["checked"]["examples"] for r in runs if r["checked"]["wrong"]],
        "input_mb": round(input_bytes / 1e6, 1),
        "file_mb": round(file_bytes / 1e6, 1),
        "generated_events": records,
        "damage": damage,
        "raw_inserted": report["raw_inserted"],
        "dlq_inserted": report["dlq_inserted"],
        "seconds": [round(r["ingest"]["seconds"], 3) for r in runs],
        "ceiling_seconds": [round(r["ceiling_seconds"], 3) for r in runs],
        "repeat": repeat,
        "workers": workers,
        "postgres": version,
        "cpus": os.cpu_count(),
    }


def _decompressed_size(path: Path) -> int:
    size = 0
    with open_log(path) as stream:  # decompresses by magic bytes, as ingest reads it
        while block := stream.read(1 << 20):
            size += len(block)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="events the generator writes")
    parser.add_argument("--damage", type=float, default=0.1, help="share of records damaged (every kind)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--repeat", type=int, default=3, help="alternated ingest and ceiling runs (medians)")
    parser.add_argument("--workers", type=int, default=1, help="files ingested at a time (dlq ingest --workers)")
    parser.add_argument("--database-url", help="an empty DLQ database to use (default: a throwaway embedded cluster)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the timed ingest, in a process
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.database_url, args.paths, args.workers)), flush=True)
        return 0
    if args.records < 2 or args.repeat < 1 or args.workers < 1 or not 0 <= args.damage <= 1:
        parser.error("--records at least 2, --repeat and --workers positive, --damage between 0 and 1")
    with database(args.database_url) as url:
        result = benchmark(
            url, records=args.records, damage=args.damage, seed=args.seed, repeat=args.repeat, workers=args.workers
        )
    print(f"PostgreSQL {result['postgres']}, {result['cpus']} CPUs: {result['records']:,} records "
          f"({result['input_mb']} MB, {result['file_mb']} MB on disk, half of it gzip), "
          f"damage {result['damage']}")  # fmt: skip
    print(f"ingest:  {result['records_per_s']:>10,.0f} records/s ({result['mb_per_s']} MB/s, {result['seconds']} s, "
          f"peak RSS {result['peak_rss_mb']} MB)")  # fmt: skip
    print(f"ceiling: {result['ceiling_records_per_s']:>10,.0f} records/s (COPY, {result['ceiling_seconds']} s) "
          f"-> ratio {result['ratio']} {result['ratios']}")  # fmt: skip
    print("records: " + ("all correct" if result["all_records_correct"] else f"WRONG: {result['wrong']}"))
    if args.json:
        print(json.dumps(result), flush=True)
    return 0 if result["all_records_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
