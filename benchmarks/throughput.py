"""End-to-end throughput of the Python worker, against the raw set-based ceiling on the same server.

    python -m benchmarks.throughput --events 100000 --workers 2 --json
    python -m benchmarks.throughput --health --events 1000000

It writes N dead letters straight into the database (set-based, from ~2,000 templates built by the real
reader and ingest routing, so each row is stored exactly as ingest would store it), keeps the ground truth of
every row in side tables (``--mix standard``: a fixed mix of seven kinds; ``--mix realistic``: what ingest puts
in the DLQ from a log damaged with the generator's whole damage mix), runs
``dlq_assets.core.processing.pool.process`` over the whole backlog, checks that every event ended where it must,
then reloads the same backlog and times the ceiling: one set-based claim-and-resolve ``UPDATE`` per batch and
nothing else, with as many connections as workers. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import bisect
import io
import itertools
import json
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from dlq_assets.core.processing.config import LEASE_MODES, WorkerConfig
from dlq_assets.core.processing.pool import process

# Per 100 dead letters. Resolvable: repairable raw text (a trailing comma, a lost closing brace) and valid events
# after a transient failure. Not resolvable: cut values and binary junk (retried later, nothing invented),
# malicious records (never claimed: they wait for security_admin). Tampered: payload changed after insert, so
# quarantined.
MIX = {
    "trailing_comma": 30,
    "missing_brace": 30,
    "transient": 25,
    "cut_value": 5,
    "binary_junk": 5,
    "tampered": 4,
    "malicious": 1,
}
# The kinds that must end resolved, and how: the dead letter's resolution_method and the raw_events row's
# repair_strategy (a closed truncation is stored partial, nothing else is).
RESOLVED_AS = {
    "trailing_comma": ("repair:tokenizer_fix", "tokenizer_fix"),
    "missing_brace": ("repair:truncation_closed", "truncation_closed"),
    "transient": ("replay", "replay"),
}
RESOLVED_KINDS = tuple(RESOLVED_AS)
VARIANTS = 20  # templates per mix slot: 2,000 distinct Cowrie events
SOURCES = 7  # log files the dead letters come from (coprime with 100: every file gets the whole mix)
VALID_RECORD_BYTES = 460  # a dead letter is followed by 0-3 valid records of about this size in its file
SLOT_STRIDE = 37  # row i uses mix slot (i * 37) % 100: the kinds interleave
TAMPERED_IP = "198.51.100.66"
_SIDE_TABLES = ("bench_truth", "bench_templates")
_DLQ_TABLES = (
    "dead_letter_events",
    "dlq_idempotency_keys",
    "raw_events",
    "dlq_poison_events",
    "dlq_processing_metrics",
    "dlq_circuit_breaker_state",
)


@dataclass(frozen=True)
class Template:
    id: int
    kind: str
    reason: str
    payload: str  # canonical JSON, as ingest stores it
    metadata: str
    priority: int
    classification: str | None
    record_bytes: int
    expected: str | None  # the event raw_events must hold afterwards (None: must not be there)
    tampered: str | None = None  # the payload after tampering (the checksum stays the original's)
    # The realistic mix: the run of adjacent dead letters the record belongs to, its offset from the run's first
    # byte, what must become of it (resolved, unresolved, untouched), and the events raw_events must hold at
    # offsets within its bytes (offset from the record's first byte, canonical JSON of the generator's original).
    group: int | None = None
    group_offset: int = 0
    expect: str | None = None
    events: tuple[tuple[int, str], ...] = ()


# --- the backlog -------------------------------------------------------------------------------------------


def _routed(template_id: int, kind: str, data: bytes, expected: str | None) -> Template | None:
    """The dead letter ingest makes of one record's bytes, or None when the bytes are not one dead letter."""
    from dlq_assets.core import jsonutil
    from dlq_assets.core.intake.ingest import _DeadLetter, route
    from dlq_assets.core.intake.reader import read_records

    records = list(read_records(io.BytesIO(data)))
    dead = route(records[0]) if len(records) == 1 else None
    if not isinstance(dead, _DeadLetter):
        return None
    metadata = {"payload_form": dead.metadata["payload_form"], "record_bytes": dead.metadata["record_bytes"]}
    return Template(
        template_id,
        kind,
        dead.reason,
        jsonutil.canonical_json(dead.payload),
        json.dumps(metadata),
        dead.priority,
        dead.classification,
        len(data),
        expected,
    )


def _template(template_id: int, kind: str, event: dict[str, Any], rng: random.Random) -> Template:
    from dlq_assets.core import jsonutil
    from dlq_assets.devtools.generator import _binary_junk, _line

    line = _line(event)  # the generator's one-line layout, as Cowrie writes it
    expected = jsonutil.canonical_json(jsonutil.loads(line))
    found: Template | None = None
    if kind == "transient" or (kind == "tampered" and template_id % 2 == 0):
        # A valid event whose write failed: stored as parsed JSON, default priority, no classification.
        metadata = json.dumps({"payload_form": "json", "record_bytes": len(line.encode())})
        found = Template(template_id, kind, "target_unavailable", expected, metadata, 5, None, len(line.encode()),
                         expected)  # fmt: skip
        if kind == "tampered":
            tampered = {**jsonutil.loads(expected), "src_ip": TAMPERED_IP}
            found = replace(found, tampered=jsonutil.canonical_json(tampered))
    elif kind in ("trailing_comma", "tampered"):
        found = _routed(template_id, kind, (line[:-1] + ",}").encode(), expected)
        if found is not None and kind == "tampered":
            text = jsonutil.loads(found.payload)["raw_text"].replace(event["src_ip"], TAMPERED_IP, 1)
            found = replace(found, tampered=jsonutil.canonical_json({"raw_text": text}))
    elif kind == "missing_brace":
        found = _routed(template_id, kind, line[:-1].encode(), expected)
    elif kind == "cut_value":  # cut inside the timestamp: a value is gone, nothing may be invented
        cut = line.index('"timestamp": "') + len('"timestamp": "') + 7
        found = _routed(template_id, kind, line[:cut].encode(), None)
    elif kind == "malicious":  # injection in a structural field: ingest classifies it malicious
        found = _routed(template_id, kind, _line({**event, "session": "x'; DROP TABLE raw_events; --"}).encode(), None)
    elif kind == "binary_junk":
        for _ in range(100):
            found = _routed(template_id, kind, _binary_junk(event, rng)[0], None)
            if found is not None and found.reason in ("invalid_utf8", "nul_byte"):
                break
    if found is None or (kind == "tampered") != (found.tampered is not None):
        raise RuntimeError(f"could not build a {kind} dead letter from event {template_id}")
    return found if kind in RESOLVED_KINDS else replace(found, expected=None)


def build_templates(seed: int = 7) -> list[Template]:
    """100 mix slots x VARIANTS templates, each from its own generated Cowrie event, deterministic by seed."""
    from dlq_assets.devtools.generator import generate_events

    slots = [kind for kind, share in MIX.items() for _ in range(share)]
    events = generate_events(len(slots) * VARIANTS, seed=seed)
    rng = random.Random(seed)
    return [
        _template(slot * VARIANTS + v, kind, events[slot * VARIANTS + v], rng)
        for slot, kind in enumerate(slots)
        for v in range(VARIANTS)
    ]


def create_side_tables(conn: psycopg.Connection[Any], templates: list[Template], events: int) -> None:
    """bench_templates (what each kind looks like, what it must become) and bench_truth (one row per event)."""
    conn.execute("DROP TABLE IF EXISTS bench_truth, bench_templates")
    conn.execute(
        """
        CREATE TABLE bench_templates (
            id int PRIMARY KEY, kind text NOT NULL, reason text NOT NULL, payload jsonb NOT NULL,
            checksum text, metadata jsonb NOT NULL, priority int NOT NULL, classification text,
            record_bytes int NOT NULL, expected jsonb, tampered jsonb)
        """
    )
    columns = "id, kind, reason, payload, metadata, priority, classification, record_bytes, expected, tampered"
    with conn.cursor().copy(f"COPY bench_templates ({columns}) FROM STDIN") as copy:
        for t in templates:
            copy.write_row(
                (t.id, t.kind, t.reason, t.payload, t.metadata, t.priority, t.classification, t.record_bytes,
                 t.expected, t.tampered)
            )  # fmt: skip
    conn.execute("UPDATE bench_templates SET checksum = dlq_payload_checksum(payload)")
    # Row i: mix slot (i * 37) % 100, a variant of it, a source file, and an offset that advances by its record,
    # its newline and 0-3 valid records (which went to raw_events at ingest and are not in the DLQ).
    conn.execute(
        sql.SQL(
            """
            CREATE TABLE bench_truth AS
            SELECT g.i, t.id AS template_id, t.kind,
                   '/var/log/cowrie/hp-' || (g.i % {sources}) || '/cowrie.json' AS source,
                   (7000 + g.i % {sources})::text AS source_inode,
                   sum(t.record_bytes + 1 + {valid} * (abs(hashint8(g.i)) % 4)) OVER w
                       - (t.record_bytes + 1 + {valid} * (abs(hashint8(g.i)) % 4)) AS source_offset
              FROM generate_series(0, {last}) AS g(i)
              JOIN bench_templates t ON t.id = ((g.i * {stride}) % 100) * {variants} + (g.i / 100) % {variants}
            WINDOW w AS (PARTITION BY g.i % {sources} ORDER BY g.i)
            """
        ).format(
            sources=sql.Literal(SOURCES),
            valid=sql.Literal(VALID_RECORD_BYTES),
            last=sql.Literal(events - 1),
            stride=sql.Literal(SLOT_STRIDE),
            variants=sql.Literal(VARIANTS),
        )
    )
    conn.execute("CREATE UNIQUE INDEX ON bench_truth (source, source_offset)")
    conn.execute("ANALYZE bench_templates, bench_truth")


# --- the realistic mix ---------------------------------------------------------------------------------------

MIXES = ("standard", "realistic")
# The realistic backlog: a log of this many generated events, a share of its lines damaged by the generator's
# whole damage mix (write_corrupted_log's default rate), read by the real reader and routed by the real ingest;
# its dead letters (about 2,000) are the templates.
REALISTIC_LOG_EVENTS = 8_600
REALISTIC_CORRUPTION_RATE = 0.3
RESOLVED, UNRESOLVED, UNTOUCHED = "resolved", "unresolved", "untouched"


@dataclass
class RealisticLog:
    """What building the realistic templates found in the generated log (reported beside the run's numbers)."""

    log_events: int
    log_bytes: int
    records: int  # the reader's records
    dead_letters: int
    groups: int  # runs of adjacent dead letters (no valid record between them): the unit repeated in the backlog
    groups_left_out: int  # runs holding part of an event whose other part ingest stored valid (none seen)
    largest_group: int
    damaged_not_in_dlq: dict[str, int]  # damaged events ingest stored valid (the reader handled their damage)


def _generated_log(seed: int) -> tuple[bytes, list[Any]]:
    """The bytes of a generated, damaged Cowrie log and the generator's truth (one record per event)."""
    from dlq_assets.devtools.generator import write_corrupted_log

    with tempfile.TemporaryDirectory(prefix="dlq-bench-log-") as tmp:
        path = Path(tmp) / "cowrie.json"
        truth = write_corrupted_log(
            path, n_events=REALISTIC_LOG_EVENTS, seed=seed, corruption_rate=REALISTIC_CORRUPTION_RATE
        )
        return path.read_bytes(), truth


def _overlapping(starts: list[int], truth: Sequence[Any], lo: int, hi: int) -> list[int]:
    """Indexes of the truth records whose bytes overlap [lo, hi) (records never overlap one another)."""
    found, k = [], max(bisect.bisect_right(starts, lo) - 1, 0)
    while k < len(truth) and truth[k].offset < hi:
        if truth[k].offset + truth[k].length > lo:
            found.append(k)
        k += 1
    return found


def build_realistic_templates(seed: int = 7) -> tuple[list[Template], RealisticLog]:
    """The dead letters ingest makes of a generated log damaged with the generator's whole mix, each with what
    must become of it, decided from the generator's truth (never by running the engine).

    The log is read by the real reader (``read_records`` with ``is_event`` and ``is_cut_record``, as ingest reads
    it) and every record routed by ``route``; valid records went to raw_events at ingest and are no backlog.
    Adjacent dead letters (no valid record between them) form a group, kept together at their real relative
    offsets: stitching and the wait for fragments only ever look at contiguous records, so each group is
    repeated in the backlog as it stood in the log, groups apart by at least one valid record's bytes.

    The truth: dead letters that share an event's bytes (an event cut into fragments, or one record holding
    several events) form a component. A component is recoverable when every event in it is one the generator
    says its bytes can rebuild (``TruthRecord.recoverable``), and none of its records is classified malicious
    (never claimed: it waits for security_admin). Then every dead letter of it must end resolved, and raw_events
    must hold exactly the generator's original of each of its events (canonical JSON), once, at the event's
    offset. Otherwise nothing of it may reach raw_events (a dead letter is resolved whole or not at all: a repair
    never drops part of a record nor invents what it lost): each must stay pending with a backoff or be
    poisoned, and a malicious one untouched.
    """
    from dlq_assets.core import jsonutil
    from dlq_assets.core.intake.ingest import _DeadLetter, is_cut_record, is_event, route
    from dlq_assets.core.intake.reader import read_records

    data, truth = _generated_log(seed)
    starts = [t.offset for t in truth]
    runs: list[list[tuple[Any, Any]]] = [[]]
    valid: list[tuple[int, int]] = []  # the valid records' spans
    records = 0
    for record in read_records(io.BytesIO(data), accept=is_event, is_cut=is_cut_record):
        records += 1
        routed = route(record)
        if isinstance(routed, _DeadLetter):
            runs[-1].append((record, routed))
        else:
            valid.append((record.offset, record.offset + len(record.raw)))
            if runs[-1]:
                runs.append([])
    runs = [run for run in runs if run]
    in_valid = {k for lo, hi in valid for k in _overlapping(starts, truth, lo, hi)}
    in_dead: set[int] = set()
    templates: list[Template] = []
    groups = left_out = 0
    for run in runs:
        spans = [_overlapping(starts, truth, r.offset, r.offset + len(r.raw)) for r, _ in run]
        touched = {k for found in spans for k in found}
        in_dead |= touched
        if touched & in_valid:  # part of an event stored valid, part dead: no truth to hold it to (never seen)
            left_out += 1
            continue
        # components: dead letters sharing an event
        component = list(range(len(run)))

        def root(m: int, component: list[int] = component) -> int:
            while component[m] != m:
                m = component[m]
            return m

        owner: dict[int, int] = {}
        for m, found in enumerate(spans):
            for k in found:
                if k in owner:
                    component[root(m)] = root(owner[k])
                owner[k] = m
        recoverable: dict[int, bool] = {}
        for m, (found, (_, dead)) in enumerate(zip(spans, run, strict=True)):
            ok = bool(found) and all(truth[k].recoverable for k in found) and dead.classification != "malicious"
            recoverable[root(m)] = recoverable.get(root(m), True) and ok
        group, first = groups, run[0][0].offset
        groups += 1
        for m, ((record, dead), found) in enumerate(zip(run, spans, strict=True)):
            lo, hi = record.offset, record.offset + len(record.raw)
            events: tuple[tuple[int, str], ...] = ()
            if dead.classification == "malicious":
                expect = UNTOUCHED
            elif recoverable[root(m)]:
                expect = RESOLVED
                events = tuple(
                    (truth[k].offset - lo, jsonutil.canonical_json(truth[k].original))
                    for k in found
                    if lo <= truth[k].offset < hi
                )
            else:
                expect = UNRESOLVED
            kind = "+".join(sorted({truth[k].corruption for k in found})) or "no_event"
            templates.append(
                Template(len(templates), kind, dead.reason, jsonutil.canonical_json(dead.payload),
                         json.dumps(dead.metadata), dead.priority, dead.classification, len(record.raw), None,
                         group=group, group_offset=lo - first, expect=expect, events=events)
            )  # fmt: skip
        for m in range(len(run)):  # every event of a recoverable component starts in one of its dead letters
            if recoverable[root(m)]:
                for k in spans[m]:
                    if not any(
                        r.offset <= truth[k].offset < r.offset + len(r.raw)
                        for n, (r, _) in enumerate(run)
                        if root(n) == root(m)
                    ):
                        raise RuntimeError(f"event at {truth[k].offset} starts outside its dead letters")
    damaged_valid = Counter(t.corruption for k, t in enumerate(truth) if k not in in_dead and t.corruption != "clean")
    sizes = Counter(t.group for t in templates)
    report = RealisticLog(
        log_events=REALISTIC_LOG_EVENTS,
        log_bytes=len(data),
        records=records,
        dead_letters=len(templates),
        groups=groups,
        groups_left_out=left_out,
        largest_group=max(sizes.values()),
        damaged_not_in_dlq=dict(sorted(damaged_valid.items())),
    )
    return templates, report


def _realistic_plan(sizes: list[int], events: int) -> tuple[int, list[int]]:
    """The backlog's groups: (q, tail) for ``q`` passes over every group in log order, then ``tail``: groups
    from the start of the log while they fit, the rest filled with groups of one dead letter, so that the
    backlog holds exactly ``events`` rows."""
    cycle = sum(sizes)
    passes, left = divmod(events, cycle)
    tail: list[int] = []
    for group, size in enumerate(sizes):
        if size > left:
            break
        tail.append(group)
        left -= size
    singles = [group for group, size in enumerate(sizes) if size == 1]
    if left and not singles:
        raise RuntimeError("no group of one dead letter to fill the backlog with")
    tail += [singles[n % len(singles)] for n in range(left)]
    return passes, tail


def create_realistic_side_tables(conn: psycopg.Connection[Any], templates: list[Template], events: int) -> None:
    """bench_templates (one row per dead letter of the generated log, with its group and what must become of it),
    bench_events (the events raw_events must hold at offsets within a template's bytes) and bench_truth (one
    row per backlog event: each group repeated at its own place in one of the source files)."""
    conn.execute("DROP TABLE IF EXISTS bench_truth, bench_templates, bench_events")
    conn.execute(
        """
        CREATE TABLE bench_templates (
            id int PRIMARY KEY, kind text NOT NULL, reason text NOT NULL, payload jsonb NOT NULL,
            checksum text, metadata jsonb NOT NULL, priority int NOT NULL, classification text,
            record_bytes int NOT NULL, expected jsonb, tampered jsonb,
            grp int NOT NULL, group_offset bigint NOT NULL, expect text NOT NULL)
        """
    )
    conn.execute("CREATE TABLE bench_events (template_id int NOT NULL, at bigint NOT NULL, payload jsonb NOT NULL)")
    columns = "id, kind, reason, payload, metadata, priority, classification, record_bytes, grp, group_offset, expect"
    with conn.cursor().copy(f"COPY bench_templates ({columns}) FROM STDIN") as copy:
        for t in templates:
            copy.write_row(
                (t.id, t.kind, t.reason, t.payload, t.metadata, t.priority, t.classification, t.record_bytes,
                 t.group, t.group_offset, t.expect)
            )  # fmt: skip
    with conn.cursor().copy("COPY bench_events (template_id, at, payload) FROM STDIN") as copy:
        for t in templates:
            for at, payload in t.events:
                copy.write_row((t.id, at, payload))
    conn.execute("UPDATE bench_templates SET checksum = dlq_payload_checksum(payload)")
    conn.execute("CREATE INDEX ON bench_events (template_id)")
    groups: dict[int, list[Template]] = {}
    for t in templates:
        groups.setdefault(t.group or 0, []).append(t)
    spans = [max(t.group_offset + t.record_bytes for t in members) for _, members in sorted(groups.items())]
    passes, tail = _realistic_plan([len(members) for _, members in sorted(groups.items())], events)
    # Instance k of a group (``passes`` times every group in log order, then the tail) goes to file k % SOURCES,
    # after the previous instance in that file, its bytes, a newline and 1-3 valid records (which went to
    # raw_events at ingest): instances never touch, as the groups did not in the log.
    conn.execute(
        sql.SQL(
            """
            CREATE TABLE bench_truth AS
            WITH spans AS (
                SELECT (g.n - 1)::int AS grp, g.span FROM unnest(%(spans)s::bigint[]) WITH ORDINALITY AS g(span, n)
            ), instances AS (
                SELECT p.n * {groups} + g.grp AS k, g.grp FROM generate_series(0, %(passes)s - 1) AS p(n)
                 CROSS JOIN spans g
                UNION ALL
                SELECT %(passes)s * {groups} + t.n - 1, t.grp
                  FROM unnest(%(tail)s::int[]) WITH ORDINALITY AS t(grp, n)
            ), placed AS (
                SELECT i.k, i.grp, '/var/log/cowrie/hp-' || (i.k %% {sources}) || '/cowrie.json' AS source,
                       (7000 + i.k %% {sources})::text AS source_inode,
                       sum(s.span + 1 + {valid} * (1 + abs(hashint8(i.k)) %% 3)) OVER w
                           - (s.span + 1 + {valid} * (1 + abs(hashint8(i.k)) %% 3)) AS base
                  FROM instances i JOIN spans s USING (grp)
                WINDOW w AS (PARTITION BY i.k %% {sources} ORDER BY i.k)
            )
            SELECT (row_number() OVER (ORDER BY p.k, t.group_offset) - 1)::bigint AS i, t.id AS template_id,
                   t.kind, t.expect, p.source, p.source_inode, p.base + t.group_offset AS source_offset
              FROM placed p JOIN bench_templates t ON t.grp = p.grp
            """
        ).format(groups=sql.Literal(len(spans)), sources=sql.Literal(SOURCES), valid=sql.Literal(VALID_RECORD_BYTES)),
        {"spans": spans, "passes": passes, "tail": tail},
    )
    conn.execute("CREATE UNIQUE INDEX ON bench_truth (source, source_offset)")
    conn.execute("ANALYZE bench_templates, bench_events, bench_truth")


def prepare(conn: psycopg.Connection[Any], mix: str, seed: int, events: int) -> dict[str, Any] | None:
    """Build the mix's templates and side tables; for the realistic mix, what the generated log held."""
    if mix == "standard":
        create_side_tables(conn, build_templates(seed), events)
        return None
    if mix != "realistic":
        raise ValueError(f"unknown mix {mix!r}: one of {', '.join(MIXES)}")
    templates, log = build_realistic_templates(seed)
    create_realistic_side_tables(conn, templates, events)
    return {**asdict(log), "kinds": _shares(templates)}


def _shares(templates: list[Template]) -> dict[str, dict[str, Any]]:
    """Per kind of the realistic templates: how many, their share (%), and what must become of them."""
    kinds: dict[str, dict[str, Any]] = {}
    for t in sorted(templates, key=lambda t: t.kind):
        kind = kinds.setdefault(t.kind, {"templates": 0, "share": 0.0, RESOLVED: 0, UNRESOLVED: 0, UNTOUCHED: 0})
        kind["templates"] += 1
        kind[t.expect or UNRESOLVED] += 1
    for kind in kinds.values():
        kind["share"] = round(100 * kind["templates"] / len(templates), 1)
    return dict(sorted(kinds.items(), key=lambda item: -item[1]["templates"]))


def _superuser(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0])


def load_backlog(conn: psycopg.Connection[Any]) -> float:
    """Empty the DLQ tables and insert the whole backlog (then tamper with some rows); returns seconds."""
    started = time.perf_counter()
    conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.SQL(", ").join(map(sql.Identifier, _DLQ_TABLES))))
    superuser = _superuser(conn)
    with conn.transaction():
        if superuser:  # skip the per-row insert trigger: the checksum and key it would set are set here, set-based
            conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            """
            INSERT INTO dead_letter_events (ingest_id, source, source_inode, source_offset, reason, payload,
                                            metadata_json, payload_checksum, idempotency_key, priority,
                                            classification, created_at, next_attempt_at)
            SELECT 'benchmark', b.source, b.source_inode, b.source_offset, t.reason, t.payload, t.metadata,
                   t.checksum,
                   'sha256:' || encode(sha256(convert_to(
                       concat_ws('|', b.source, b.source_inode, b.source_offset, t.checksum), 'UTF8')), 'hex'),
                   t.priority, t.classification, s.at + b.i * interval '1 microsecond', s.at
              FROM bench_truth b
              JOIN bench_templates t ON t.id = b.template_id
             CROSS JOIN (SELECT date_trunc('second', now()) - interval '1 hour' AS at) s
             ORDER BY b.i
            """
        )
        if superuser:
            conn.execute(
                "INSERT INTO dlq_idempotency_keys (idempotency_key, event_id, event_created_at) "
                "SELECT idempotency_key, id, created_at FROM dead_letter_events"
            )
            conn.execute("SELECT dlq_recount_events()")  # the health counters' triggers were skipped too
    # Tampering after the insert, as a superuser (or anyone with UPDATE) could: the checksum no longer matches.
    conn.execute(
        """
        UPDATE dead_letter_events e SET payload = t.tampered
          FROM bench_truth b JOIN bench_templates t ON t.id = b.template_id
         WHERE t.tampered IS NOT NULL AND e.source = b.source AND e.source_offset = b.source_offset
        """
    )
    conn.execute("VACUUM ANALYZE dead_letter_events, dlq_idempotency_keys, raw_events")
    if superuser:
        conn.execute("CHECKPOINT")  # each timed run starts without the load's dirty pages to write
    return time.perf_counter() - started


# --- the runs ----------------------------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_engine(url: str, workers: int, batch_size: int, lease_mode: str = "transaction") -> dict[str, Any]:
    config = WorkerConfig(
        batch_size=batch_size, min_batch_size=batch_size, max_batch_size=batch_size, lease_mode=lease_mode
    )
    busy, total, children = *_cpu_ticks(), _children_cpu()
    started = time.perf_counter()
    report = process(url, config, workers=workers)
    seconds = time.perf_counter() - started
    busy, total, children = _cpu_ticks()[0] - busy, _cpu_ticks()[1] - total, _children_cpu() - children
    batch_ms = sorted(s * 1000 for s in report.batch_seconds)
    return {
        "report": report,
        "seconds": seconds,
        "p50_batch_ms": round(statistics.median(batch_ms), 1) if batch_ms else None,
        "p95_batch_ms": round(_nearest_rank(batch_ms, 0.95), 1) if batch_ms else None,
        "peak_rss_mb": report.peak_rss_mb,
        "rss_method": "VmHWM of each worker process, read by the worker" if workers > 1 else "VmHWM of this process",
        # CPU seconds of the worker processes (0 with one in-process worker), and how busy the whole machine was
        "worker_cpu_seconds": round(children, 2),
        "machine_busy": round(busy / total, 3) if total else None,
    }


# Claim-and-resolve with nothing else. The batch is the claims' own query (dlq_due_events_sql: by priority, then due
# time, one range of the claim index per priority, malicious events left out), its parameters written in: no
# priority ceiling ($1), any reason ($2), the batch size ($3). Its rate counts every event of the backlog, as the
# engine's does: both work through the same events.
CEILING_SQL = """
UPDATE dead_letter_events e
   SET resolved = true, resolved_at = now(), resolution_method = 'ceiling', last_processed_at = now()
  FROM ({due}) c
 WHERE e.id = c.id AND e.created_at = c.created_at
"""


def run_ceiling(url: str, workers: int, batch_size: int) -> tuple[int, float]:
    """The ceiling statement looped on each of ``workers`` connections until nothing is left; (rows, seconds)."""
    with psycopg.connect(url) as conn:
        (due,) = conn.execute(
            "SELECT dlq_due_events_sql('c.id, c.created_at', 'c.processing_lock IS NULL OR c.lock_expires_at <= now()')"
        ).fetchone()
    due = due.replace("$1", "NULL").replace("$2", "NULL::text").replace("$3", str(int(batch_size)))
    statement = CEILING_SQL.format(due=due)
    return _parallel(url, workers, lambda conn: conn.execute(statement).rowcount)


def _nearest_rank(ordered: list[float], q: float) -> float:
    """The q-quantile (0 < q <= 1) of a sorted, non-empty list, by nearest rank: a value that was measured."""
    return ordered[math.ceil(q * len(ordered)) - 1]


def run_floor(url: str, workers: int, batch_size: int, lease_mode: str = "transaction") -> tuple[int, float]:
    """The engine's own SQL with no Python work: claim under the lease mode's protocol (transaction: release dead
    batches, claim, journal; committed: claim and commit), write every claimed payload to raw_events and complete
    the batch resolved; (rows, seconds)."""
    journals: dict[int, psycopg.Connection[Any]] = {}

    def batch(conn: psycopg.Connection[Any]) -> int:
        journal = None
        if lease_mode == "transaction":
            journal = journals.get(id(conn)) or journals.setdefault(id(conn), psycopg.connect(url, autocommit=True))
        return floor_batch(conn, journal, batch_size, lease_mode)

    try:
        return _parallel(url, workers, batch)
    finally:
        for journal in journals.values():
            journal.close()


def floor_batch(
    conn: psycopg.Connection[Any],
    journal: psycopg.Connection[Any] | None,
    batch_size: int,
    lease_mode: str = "transaction",
) -> int:
    """One batch of the floor (``journal``: an autocommit session of the worker's own, which transaction leases
    need); the rows it resolved."""
    with conn.transaction() if lease_mode == "transaction" else nullcontext():
        if lease_mode == "transaction":
            assert journal is not None, "a transaction lease is journalled from a second session"
            journal.execute("SELECT dlq_release_dead_batches()")
            lease = uuid.uuid4()
            ids = [r[0] for r in conn.execute("SELECT id FROM dlq_claim_batch(%s, %s)", (lease, batch_size))]
            if ids:
                journal.execute("SELECT dlq_journal_batch(%s, %b)", (lease, ids))
        else:
            rows = conn.execute("SELECT id, processing_lock FROM dlq_claim_events(%s, 1800)", (batch_size,))
            claimed = rows.fetchall()
            lease, ids = (claimed[0][1] if claimed else None), [r[0] for r in claimed]
        if not ids:
            return 0
        _floor_write_and_complete(conn, lease, ids)
    return len(ids)


def _floor_write_and_complete(conn: psycopg.Connection[Any], lease: Any, ids: list[int]) -> None:
    with conn.transaction():
        conn.execute(
            """
            INSERT INTO raw_events (source, source_inode, source_offset, eventid, payload, dlq_event_id,
                                    repair_strategy)
            SELECT source, source_inode, source_offset, coalesce(payload ->> 'eventid', 'floor'), payload, id,
                   'floor'
              FROM dead_letter_events WHERE id = ANY (%b)
            ON CONFLICT ON CONSTRAINT raw_events_source_position DO NOTHING
            """,
            (ids,),
        )
        conn.execute(
            "SELECT count(*) FROM dlq_complete_batch(%s, %b, array_fill('resolved'::text, ARRAY[%s]))",
            (lease, ids, len(ids)),
        ).fetchone()


def _parallel(url: str, workers: int, batch: Any) -> tuple[int, float]:
    """Run ``batch(conn)`` on ``workers`` connections at once until each gets 0; (rows, seconds)."""
    connections = [psycopg.connect(url, autocommit=True) for _ in range(workers)]
    start = threading.Barrier(workers + 1)
    done = [0] * workers

    def loop(index: int) -> None:
        start.wait()
        while (n := batch(connections[index])) > 0:
            done[index] += n

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    try:
        for thread in threads:
            thread.start()
        start.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    finally:
        for conn in connections:
            conn.close()
    return sum(done), seconds


def _ends_without_raw_event(absent: str) -> dict[str, str]:
    """The states of an event that must give nothing to raw_events (``absent``: that it gave none), in both mixes'
    checks: a malicious one untouched (never claimed until security_admin reviews it), any other pending with a
    backoff or poisoned. Pending after exactly one attempt: every failure these mixes meet waits an hour before the
    next (dlq_retry_policies), longer than a run, so a second attempt in a run would be a charge twice."""
    return {
        "untouched": f"""d.classification = 'malicious' AND NOT d.resolved AND d.retry_count = 0
                       AND d.processing_attempts = '[]' AND d.error_history = '[]' AND {absent}""",
        "unresolved": f"""{absent} AND (
                       (d.id IS NOT NULL AND NOT d.resolved AND d.quarantined_at IS NULL AND d.retry_count = 1
                        AND d.next_attempt_at > now() AND d.next_attempt_at < now() + interval '3 days'
                        AND {_attempts_on_record("d")})
                       OR (d.id IS NULL AND p.id IS NOT NULL AND p.poison_reason IS NOT NULL
                           AND {_attempts_on_record("p")}))""",
    }


def _attempts_on_record(row: str) -> str:
    """Each attempt of a dead letter (or poisoned event) ``row`` on record: one error per attempt, a claim entry
    for each (more when it was also claimed and given back unused: as a neighbour, or waiting for a fragment), and
    no death charged (no worker dies in a run: a lease_expired would be a charge no crash caused)."""
    return f"""jsonb_array_length({row}.error_history) = {row}.retry_count
               AND jsonb_array_length({row}.processing_attempts) >= {row}.retry_count
               AND NOT {row}.error_history @> '[{{"error_class": "lease_expired"}}]'"""


# A resolved dead letter "d": its attempts on record (the last one, which resolved it, with a claim entry and no
# error), not quarantined, with its resolution time.
_RESOLVED_ON_RECORD = f"""
    d.resolved AND d.resolved_at IS NOT NULL AND d.quarantined_at IS NULL
    AND jsonb_array_length(d.processing_attempts) >= d.retry_count + 1 AND {_attempts_on_record("d")}
"""


# A raw_events row "r" holds what is derived from its payload "x": eventid, session, source address and time.
DERIVED_COLUMNS = """
    r.eventid = x ->> 'eventid' AND r.session IS NOT DISTINCT FROM x ->> 'session'
    AND r.src_ip IS NOT DISTINCT FROM (x ->> 'src_ip')::inet
    AND r.event_timestamp IS NOT DISTINCT FROM (x ->> 'timestamp')::timestamptz
"""
# ... and, written by the engine, is partial exactly when a truncation was closed, with no text or duplicate keys of
# its own.
_DERIVED_AS_PAYLOAD = f"""{DERIVED_COLUMNS}
    AND r.partial = (r.repair_strategy = 'truncation_closed') AND r.original_text IS NULL AND NOT r.duplicate_keys
"""


def verify(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Every event against its ground truth; returns {kind: [correct, total]} and the global checks."""
    rows = conn.execute(
        """
        WITH raw AS (
            SELECT source, source_inode, source_offset, count(*) AS copies, min(payload::text) AS payload,
                   min(payload_checksum) AS checksum, min(dlq_event_id) AS dlq_event_id,
                   min(repair_strategy) AS repair_strategy,
                   bool_and({derived}) AS derived_ok
              FROM (SELECT r.*, r.payload AS x FROM raw_events r) r GROUP BY 1, 2, 3
        ), resolved_as (kind, method, strategy) AS (
            SELECT * FROM unnest(%(resolved)s::text[], %(methods)s::text[], %(strategies)s::text[]))
        SELECT b.kind, count(*),
               count(*) FILTER (WHERE coalesce(d.processing_lock IS NULL, true) AND CASE
                   WHEN b.kind = ANY (%(resolved)s) THEN
                       {resolved_on_record} AND r.copies = 1 AND r.payload = t.expected::text
                       AND r.checksum = dlq_payload_checksum(t.expected) AND p.id IS NULL
                       AND r.dlq_event_id = d.id AND r.derived_ok
                       AND (d.resolution_method, r.repair_strategy) = (a.method, a.strategy)
                   WHEN b.kind = 'tampered' THEN
                       d.quarantined_at IS NOT NULL AND d.classification = 'tampered' AND NOT d.resolved
                       AND r.copies IS NULL
                   WHEN b.kind = 'malicious' THEN {untouched}
                   ELSE {unresolved}
               END)
          FROM bench_truth b
          JOIN bench_templates t ON t.id = b.template_id
          LEFT JOIN dead_letter_events d
                 ON d.source = b.source AND d.source_inode = b.source_inode AND d.source_offset = b.source_offset
          LEFT JOIN dlq_poison_events p
                 ON p.source = b.source AND p.source_inode = b.source_inode AND p.source_offset = b.source_offset
          LEFT JOIN raw r
                 ON r.source = b.source AND r.source_inode = b.source_inode AND r.source_offset = b.source_offset
          LEFT JOIN resolved_as a ON a.kind = b.kind
         GROUP BY b.kind ORDER BY b.kind
        """.format(
            derived=_DERIVED_AS_PAYLOAD,
            resolved_on_record=_RESOLVED_ON_RECORD,
            **_ends_without_raw_event("r.copies IS NULL"),
        ),
        {
            "resolved": list(RESOLVED_AS),
            "methods": [method for method, _ in RESOLVED_AS.values()],
            "strategies": [strategy for _, strategy in RESOLVED_AS.values()],
        },
    ).fetchall()
    kinds = {kind: [correct, total] for kind, total, correct in rows}
    events, raw, dead, poisoned, journalled = conn.execute(
        "SELECT (SELECT count(*) FROM bench_truth), (SELECT count(*) FROM raw_events), "
        "(SELECT count(*) FROM dead_letter_events), (SELECT count(*) FROM dlq_poison_events), "
        "(SELECT count(*) FROM dlq_batch_leases)"
    ).fetchone()
    expected_raw = sum(total for kind, (_, total) in kinds.items() if kind in RESOLVED_KINDS)
    # a journal entry left behind would charge its events at the next claim, though nobody died
    ok = all(c == t for c, t in kinds.values()) and raw == expected_raw and dead + poisoned == events
    ok = ok and journalled == 0
    return {"kinds": kinds, "events": events, "raw_events": raw, "expected_raw_events": expected_raw,
            "all_states_correct": ok}  # fmt: skip


def verify_realistic(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The realistic mix's events against their truth: per dead letter its state, and the raw_events rows at
    offsets within its bytes (exactly the events it must give, each once, with the original's payload and
    checksum, or none at all); then the totals."""
    conn.execute("ANALYZE raw_events")  # analyzed empty at the load: planned as such, the joins below crawl
    rows = conn.execute(
        """
        WITH got AS (  -- each raw_events row, counted for the backlog event whose bytes it starts in
            SELECT b.i, count(*) AS n
              FROM raw_events r
             CROSS JOIN LATERAL (
                   SELECT b.i, b.source_inode, b.source_offset, t.record_bytes
                     FROM bench_truth b JOIN bench_templates t ON t.id = b.template_id
                    WHERE b.source = r.source AND b.source_offset <= r.source_offset
                    ORDER BY b.source_offset DESC LIMIT 1) b
             WHERE b.source_inode = r.source_inode AND r.source_offset < b.source_offset + b.record_bytes
             GROUP BY b.i
        ), want AS (  -- the events each must give, each looked for at its offset with its payload and checksum
            SELECT b.i, count(*) AS n,
                   count(*) FILTER (WHERE r.payload::text = x.payload::text
                                      AND r.payload_checksum = dlq_payload_checksum(x.payload)
                                      AND {derived} AND dd.resolved  -- the row's dead letter, resolved by its method
                                      AND dd.resolution_method = CASE r.repair_strategy WHEN 'replay' THEN 'replay'
                                                                 ELSE 'repair:' || r.repair_strategy END) AS exact
              FROM bench_truth b
              JOIN (SELECT e.*, e.payload AS x FROM bench_events e) x ON x.template_id = b.template_id
              LEFT JOIN raw_events r
                     ON r.source = b.source AND r.source_inode = b.source_inode
                    AND r.source_offset = b.source_offset + x.at
              LEFT JOIN dead_letter_events dd ON dd.id = r.dlq_event_id
             GROUP BY b.i
        )
        SELECT b.kind, count(*),
               count(*) FILTER (WHERE coalesce(d.processing_lock IS NULL, true) AND CASE b.expect
                   WHEN 'resolved' THEN
                       {resolved_on_record} AND p.id IS NULL
                       AND coalesce(got.n, 0) = coalesce(want.n, 0) AND coalesce(want.exact, 0) = coalesce(want.n, 0)
                   WHEN 'untouched' THEN {untouched}
                   ELSE {unresolved}
               END)
          FROM bench_truth b
          LEFT JOIN dead_letter_events d
                 ON d.source = b.source AND d.source_inode = b.source_inode AND d.source_offset = b.source_offset
          LEFT JOIN dlq_poison_events p
                 ON p.source = b.source AND p.source_inode = b.source_inode AND p.source_offset = b.source_offset
          LEFT JOIN got ON got.i = b.i
          LEFT JOIN want ON want.i = b.i
         GROUP BY b.kind ORDER BY b.kind
        """.format(
            derived=_DERIVED_AS_PAYLOAD.replace("x ->>", "x.x ->>"),
            resolved_on_record=_RESOLVED_ON_RECORD,
            **_ends_without_raw_event("got.n IS NULL"),
        )
    ).fetchall()
    kinds = {kind: [correct, total] for kind, total, correct in rows}
    events, raw, expected_raw, dead, poisoned, journalled = conn.execute(
        "SELECT (SELECT count(*) FROM bench_truth), (SELECT count(*) FROM raw_events), "
        "(SELECT count(*) FROM bench_truth b JOIN bench_events x ON x.template_id = b.template_id), "
        "(SELECT count(*) FROM dead_letter_events), (SELECT count(*) FROM dlq_poison_events), "
        "(SELECT count(*) FROM dlq_batch_leases)"
    ).fetchone()
    ok = all(c == t for c, t in kinds.values()) and raw == expected_raw and dead + poisoned == events
    ok = ok and journalled == 0  # an entry left behind would charge its events at the next claim
    return {"kinds": kinds, "events": events, "raw_events": raw, "expected_raw_events": expected_raw,
            "all_states_correct": ok}  # fmt: skip


def _active_seconds(conn: psycopg.Connection[Any]) -> float | None:
    (seconds,) = conn.execute(
        "SELECT extract(epoch FROM max(completed_at) - min(started_at))::float8 FROM dlq_processing_metrics"
    ).fetchone()
    return seconds


def _top_statements(conn: psycopg.Connection[Any], limit: int = 12) -> list[dict[str, Any]]:
    rows = conn.execute(
        """
        SELECT calls, round(total_exec_time::numeric, 1), round(mean_exec_time::numeric, 3), rows,
               regexp_replace(left(query, 110), '\\s+', ' ', 'g')
          FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY total_exec_time DESC LIMIT %s
        """,
        (limit,),
    ).fetchall()
    return [dict(zip(("calls", "total_ms", "mean_ms", "rows", "query"), r, strict=True)) for r in rows]


def _reset_statements(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")
        return True
    except psycopg.Error:
        return False


def benchmark(
    url: str,
    *,
    events: int,
    workers: int,
    batch_size: int,
    seed: int = 7,
    ceiling: bool = True,
    floor: bool = False,
    sql_stats: bool = False,
    lease_mode: str = "transaction",
    repeat: int = 1,
    mix: str = "standard",
) -> dict[str, Any]:
    """The whole measurement on one database, ``repeat`` times: load, engine, verify, and beside each engine run a
    ceiling run on the same backlog reloaded (in alternating order, so that a machine slowing down or speeding up
    does not favour either side). Medians are reported, each run in ``runs``. Leaves the tables empty."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    with psycopg.connect(url, autocommit=True) as conn:
        _require_empty(conn)
        try:
            started = time.perf_counter()
            built = prepare(conn, mix, seed, events)
            prepared = time.perf_counter() - started
            runs = [
                _run_once(conn, url, workers, batch_size, lease_mode, ceiling=ceiling, floor=floor,
                          sql_stats=sql_stats and n == 0, ceiling_first=n % 2 == 1, mix=mix)
                for n in range(repeat)
            ]  # fmt: skip
            version = conn.execute("SHOW server_version").fetchone()[0]
            sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
        finally:
            _clean(conn)
    last = runs[-1]
    report = last["engine"]["report"]  # the same counts in every run: the same backlog
    rates = [r["events_per_s"] for r in runs]
    ceilings = [r["ceiling_events_per_s"] for r in runs if r["ceiling_events_per_s"]]
    ratios = [r["ratio"] for r in runs if r["ratio"]]
    floors = [r["floor_events_per_s"] for r in runs if r.get("floor_events_per_s")]
    active = [r["active_seconds"] for r in runs if r["active_seconds"]]
    return {
        "events": events,
        "mix": mix,
        "workers": workers,
        "batch_size": batch_size,
        "lease_mode": lease_mode,
        "repeat": repeat,
        "events_per_s": round(statistics.median(rates), 1),
        "ceiling_events_per_s": round(statistics.median(ceilings), 1) if ceilings else None,
        "ratio": round(statistics.median(ratios), 3) if ratios else None,  # the median of each run's own ratio
        **({"floor_events_per_s": round(statistics.median(floors), 1)} if floors else {}),
        "p50_batch_ms": statistics.median(r["engine"]["p50_batch_ms"] for r in runs),
        "p95_batch_ms": statistics.median(r["engine"]["p95_batch_ms"] for r in runs),
        "peak_rss_mb": max(r["engine"]["peak_rss_mb"] for r in runs),
        "rss_method": last["engine"]["rss_method"],
        "worker_cpu_seconds": statistics.median(r["engine"]["worker_cpu_seconds"] for r in runs),
        "machine_busy": statistics.median(r["engine"]["machine_busy"] or 0 for r in runs),
        "all_states_correct": all(r["checked"]["all_states_correct"] for r in runs),
        "states": _states_of_every_run(runs),
        "runs": [{k: v for k, v in r.items() if k not in ("engine", "checked")} for r in runs],
        "seconds": round(statistics.median(r["engine"]["seconds"] for r in runs), 3),
        "active_seconds": round(statistics.median(active), 3) if active else None,
        "active_events_per_s": round(events / statistics.median(active), 1) if active else None,
        "batches": report.batches,
        "resolved": report.resolved,
        "retried": report.retried,
        "poisoned": report.poisoned,
        "quarantined": report.quarantined,
        "strategies": dict(report.strategies),
        "prepare_seconds": round(prepared, 1),
        "postgres": version,
        "synchronous_commit": sync,
        "cpus": os.cpu_count(),
        **({"top_statements": runs[0].get("top_statements", [])} if sql_stats else {}),
        **({"realistic": built} if built is not None else {}),
    }


def _states_of_every_run(runs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per kind, [correct, total] over every event of every run."""
    return {
        kind: [sum(r["checked"]["kinds"][kind][i] for r in runs) for i in (0, 1)]
        for kind in runs[0]["checked"]["kinds"]
    }


def _run_once(
    conn: psycopg.Connection[Any],
    url: str,
    workers: int,
    batch_size: int,
    lease_mode: str,
    *,
    ceiling: bool,
    floor: bool,
    sql_stats: bool,
    ceiling_first: bool,
    mix: str = "standard",
) -> dict[str, Any]:
    """One engine run, verified, with its ceiling (and floor) runs on the same backlog, each loaded afresh."""

    def ceiling_run() -> tuple[int | None, float | None]:
        if not ceiling:
            return None, None
        load_backlog(conn)
        return run_ceiling(url, workers, batch_size)

    ceiling_rows, ceiling_seconds = ceiling_run() if ceiling_first else (None, None)
    load_seconds = load_backlog(conn)
    stats = sql_stats and _reset_statements(conn)
    if sql_stats and not stats:  # said at once, not a failure after the runs
        print("--sql-stats: pg_stat_statements is not preloaded on this server", file=sys.stderr)
    engine = run_engine(url, workers, batch_size, lease_mode)
    top = _top_statements(conn) if stats else None
    checked = verify_realistic(conn) if mix == "realistic" else verify(conn)
    active = _active_seconds(conn)
    if not ceiling_first:
        ceiling_rows, ceiling_seconds = ceiling_run()
    floor_rate = None
    if floor:
        load_backlog(conn)
        floor_rows, floor_seconds = run_floor(url, workers, batch_size, lease_mode)
        floor_rate = floor_rows / floor_seconds
    rate = checked["events"] / engine["seconds"]
    ceiling_rate = checked["events"] / ceiling_seconds if ceiling_rows and ceiling_seconds else None
    return {
        "engine": engine,
        "checked": checked,
        "events_per_s": round(rate, 1),
        "ceiling_events_per_s": round(ceiling_rate, 1) if ceiling_rate else None,
        "ratio": round(rate / ceiling_rate, 3) if ceiling_rate else None,
        **({"floor_events_per_s": round(floor_rate, 1)} if floor_rate else {}),
        "all_states_correct": checked["all_states_correct"],
        "p50_batch_ms": engine["p50_batch_ms"],
        "p95_batch_ms": engine["p95_batch_ms"],
        "peak_rss_mb": engine["peak_rss_mb"],
        "worker_cpu_seconds": engine["worker_cpu_seconds"],
        "machine_busy": engine["machine_busy"],
        "seconds": round(engine["seconds"], 3),
        "active_seconds": round(active, 3) if active else None,
        "ceiling_rows": ceiling_rows,
        "ceiling_seconds": round(ceiling_seconds, 3) if ceiling_seconds else None,
        "load_seconds": round(load_seconds, 1),
        **({"top_statements": top} if top is not None else {}),
    }


def _require_empty(conn: psycopg.Connection[Any]) -> None:
    (busy,) = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM dead_letter_events) OR EXISTS (SELECT 1 FROM raw_events) "
        "OR EXISTS (SELECT 1 FROM dlq_poison_events)"
    ).fetchone()
    if busy:
        raise SystemExit("this database already holds dead letters or raw events: the benchmark needs an empty one")


def _clean(conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.SQL(", ").join(map(sql.Identifier, _DLQ_TABLES))))
    conn.execute("DROP TABLE IF EXISTS bench_truth, bench_templates, bench_events")


# --- health and retention at scale --------------------------------------------------------------------------


HEALTH_FULL_SCAN = """
SELECT count(*) FILTER (WHERE NOT resolved AND quarantined_at IS NULL), count(*) FILTER (WHERE resolved),
       round(avg(extract(epoch FROM (resolved_at - created_at))) FILTER (WHERE resolved), 6),
       min(created_at) FILTER (WHERE NOT resolved AND quarantined_at IS NULL), count(*) FILTER (WHERE retry_count > 5),
       count(*) FILTER (WHERE classification = 'malicious'), count(*) FILTER (WHERE priority <= 3 AND NOT resolved),
       count(*) FILTER (WHERE quarantined_at IS NOT NULL), count(*)
  FROM dead_letter_events
"""
HEALTH_COLUMNS = """
SELECT pending_events, processed_events, round(avg_resolution_time_seconds, 6), oldest_unresolved_event,
       high_retry_events, malicious_events, high_priority_events, quarantined_events, total_events
  FROM dlq_health
"""


def _timed(conn: psycopg.Connection[Any], query: str, repeats: int) -> float:
    """Median milliseconds of ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        conn.execute(query).fetchall()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


PROBE_SOURCE = "/var/log/cowrie/probe/cowrie.json"
PROBE_INSERT = """
INSERT INTO dead_letter_events (source, source_inode, source_offset, reason, payload)
VALUES (%s, 'probe', %s, 'target_unavailable', jsonb_build_object('eventid', 'cowrie.session.closed', 'probe', %s))
"""


@dataclass
class Probe:
    """What :func:`probed` saw: each probe's latency (seconds), and lock waits sampled from ``pg_locks``."""

    latencies: list[float]
    samples: int = 0
    samples_with_lock_wait: int = 0
    longest_lock_wait: float = 0.0  # seconds, the longest wait for a lock (any session of the database) seen
    longest_wait: str = ""  # who waited for what, and behind whom


LOCK_WAITS = """
SELECT coalesce(extract(epoch FROM now() - l.waitstart), 0)::float8,  -- waitstart is NULL for a moment at first
       format('%s waited for %s on %s, behind %s', left(a.query, 60), l.mode,
              coalesce(l.relation::regclass::text, l.locktype),
              (SELECT string_agg(left(b.query, 60), '; ') FROM pg_stat_activity b
                WHERE b.pid = ANY (pg_blocking_pids(l.pid))))
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE NOT l.granted AND a.datname = current_database()
 ORDER BY l.waitstart
 LIMIT 1
"""


def probed(url: str, work: Any, offsets: Iterator[int], interval: float = 0.01) -> tuple[Any, Probe]:
    """``work()``'s result, and what a worker beside it would have waited: every ``interval`` a second session
    ingests a live event, claims, writes and resolves it in one transaction (each event's source offset from
    ``offsets``), and a third samples ``pg_locks`` for sessions waiting on a lock."""
    seen = Probe([])
    stop = threading.Event()
    failure: list[BaseException] = []

    def probe() -> None:
        with psycopg.connect(url, autocommit=True) as conn, psycopg.connect(url, autocommit=True) as journal:
            while True:  # at least one probe, however short the work
                started = time.perf_counter()
                with conn.transaction():
                    n = next(offsets)
                    conn.execute(PROBE_INSERT, (PROBE_SOURCE, n, n))
                    if floor_batch(conn, journal, 1) != 1:
                        raise RuntimeError("the probe's event was not claimed")
                seen.latencies.append(time.perf_counter() - started)
                if stop.wait(interval):
                    break

    def sample() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                waiting = conn.execute(LOCK_WAITS).fetchone()
                seen.samples += 1
                if waiting:  # the longest-waiting session, if any
                    seen.samples_with_lock_wait += 1
                    if waiting[0] > seen.longest_lock_wait:
                        seen.longest_lock_wait, seen.longest_wait = waiting
                if stop.wait(interval):
                    break

    def guarded(target: Any) -> None:
        try:
            target()
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in (probe, sample)]
    for thread in threads:
        thread.start()
    try:
        result = work()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if failure:
        raise failure[0]
    return result, seen


def _probe_report(seen: Probe) -> dict[str, float | int]:
    ms = sorted(s * 1000 for s in seen.latencies)
    return {
        "probes": len(ms), "p50_ms": round(_nearest_rank(ms, 0.5), 1), "p99_ms": round(_nearest_rank(ms, 0.99), 1),
        "max_ms": round(ms[-1], 1),
        "lock_samples": seen.samples, "lock_samples_waiting": seen.samples_with_lock_wait,
        "longest_lock_wait_ms": round(seen.longest_lock_wait * 1000, 1), "longest_lock_wait": seen.longest_wait,
    }  # fmt: skip


def health(
    url: str,
    *,
    events: int,
    retention_batch_size: int = 1000,
    seed: int = 7,
    repeats: int = 5,
    mix: str = "standard",
) -> dict[str, Any]:
    """dlq_health latency on a pending backlog and on a resolved one; retention rows/s over the resolved rows."""
    from dlq_assets.core.operations.retention import run_retention

    with psycopg.connect(url, autocommit=True) as conn:
        _require_empty(conn)
        try:
            prepare(conn, mix, seed, events)
            load_backlog(conn)
            pending_ms = _timed(conn, "SELECT * FROM dlq_health", repeats)
            scan_ms = _timed(conn, HEALTH_FULL_SCAN, repeats)
            exact = conn.execute(HEALTH_FULL_SCAN).fetchone() == conn.execute(HEALTH_COLUMNS).fetchone()
            conn.execute(
                "UPDATE dead_letter_events SET resolved = true, resolved_at = now() - interval '100 days', "
                "resolution_method = 'benchmark'"
            )
            conn.execute("VACUUM ANALYZE dead_letter_events")
            resolved_ms = _timed(conn, "SELECT * FROM dlq_health", repeats)
            exact &= conn.execute(HEALTH_FULL_SCAN).fetchone() == conn.execute(HEALTH_COLUMNS).fetchone()
            # The same probe alone for 2 s first: its latency on this machine with no retention beside it.
            offsets = itertools.count()
            _, alone = probed(url, lambda: time.sleep(2), offsets)
            retention, beside = probed(
                url, lambda: run_retention(url, older_than_days=90, batch_size=retention_batch_size), offsets
            )
            (left,) = conn.execute(
                "SELECT count(*) FROM dead_letter_events WHERE source IS DISTINCT FROM %s", (PROBE_SOURCE,)
            ).fetchone()
            (probes_resolved,) = conn.execute(
                "SELECT count(*) FROM dead_letter_events e JOIN raw_events r ON r.dlq_event_id = e.id "
                "WHERE e.source = %s AND e.resolved",
                (PROBE_SOURCE,),
            ).fetchone()
        finally:
            _clean(conn)
    return {
        "events": events,
        "mix": mix,
        "health_ms_pending": pending_ms,
        "health_ms_resolved": resolved_ms,
        "health_full_scan_ms": scan_ms,  # the same numbers counted from every row: what the counters spare
        "health_exact": exact,
        "retention_rows": retention.rows_deleted,
        "retention_seconds": round(retention.seconds, 2),
        "retention_rows_per_s": round(retention.rows_per_second, 1),
        "retention_batch_size": retention_batch_size,
        "retention_batches": retention.batches,
        "retention_longest_batch_ms": round(retention.longest_batch_seconds * 1000, 1),
        "partitions_dropped": retention.partitions_dropped,
        "rows_left": left,
        # a live event's ingest-claim-write-resolve transaction beside retention, and alone on the same table
        "probe_beside_retention": _probe_report(beside),
        "probe_alone": _probe_report(alone),
        "probes_all_resolved": probes_resolved == len(alone.latencies) + len(beside.latencies),
    }


# --- the command ------------------------------------------------------------------------------------------


@contextmanager
def database(url: str | None) -> Iterator[str]:
    """The given database (migrated if needed), else a throwaway embedded cluster removed afterwards."""
    from dlq_assets.core.db import ensure_database, normalize_url
    from dlq_assets.core.migrations import migrate
    from dlq_assets.devtools.embedded import EmbeddedServer, remove_cluster

    if url:
        url = normalize_url(url)
        migrate(url)
        yield url
        return
    data_dir = Path(tempfile.mkdtemp(prefix="dlq-bench-")) / "pgdata"
    try:
        status = EmbeddedServer(data_dir).start()
        ensure_database(status.url(), "dlq_bench")
        url = status.url("dlq_bench")
        migrate(url)
        yield url
    finally:
        remove_cluster(data_dir)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


def _print_human(result: dict[str, Any]) -> None:
    if "health_ms_pending" in result:
        print(f"dlq_health at {result['events']:,} rows: {result['health_ms_pending']} ms pending, "
              f"{result['health_ms_resolved']} ms resolved (a full scan: {result['health_full_scan_ms']} ms); "
              f"equal to the full scan: {result['health_exact']}")  # fmt: skip
        print(f"retention: {result['retention_rows']:,} rows in {result['retention_seconds']} s "
              f"({result['retention_rows_per_s']:,.0f} rows/s, batch {result['retention_batch_size']}, "
              f"longest batch {result['retention_longest_batch_ms']} ms)")  # fmt: skip
        for name, label in (("probe_alone", "alone"), ("probe_beside_retention", "beside retention")):
            p = result[name]
            print(f"a live event ingested and resolved {label}: {p['probes']} probes, p50 {p['p50_ms']} ms, "
                  f"p99 {p['p99_ms']} ms, max {p['max_ms']} ms; lock waits in {p['lock_samples_waiting']} of "
                  f"{p['lock_samples']} samples, longest {p['longest_lock_wait_ms']} ms "
                  f"{p['longest_lock_wait']}")  # fmt: skip
        return
    print(f"PostgreSQL {result['postgres']}, {result['cpus']} CPUs, {result['workers']} workers, "
          f"batch {result['batch_size']}, {result['events']:,} events")  # fmt: skip
    if result["repeat"] > 1:
        for n, run in enumerate(result["runs"], 1):
            ceiling = run["ceiling_events_per_s"] or 0
            print(f"run {n}:   {run['events_per_s']:>10,.0f} events/s, ceiling {ceiling:,.0f}, "
                  f"ratio {run['ratio']}, {run['seconds']} s")  # fmt: skip
        print(f"medians of {result['repeat']} runs:")
    print(f"engine:  {result['events_per_s']:>10,.0f} events/s  ({result['seconds']} s wall, "
          f"p50 {result['p50_batch_ms']} ms, p95 {result['p95_batch_ms']} ms per batch, "
          f"peak RSS {result['peak_rss_mb']} MB)")  # fmt: skip
    if result["ceiling_events_per_s"]:
        print(f"ceiling: {result['ceiling_events_per_s']:>10,.0f} events/s  -> ratio {result['ratio']}")
    if "floor_events_per_s" in result:
        print(f"floor:   {result['floor_events_per_s']:>10,.0f} events/s  (the engine's SQL alone)")
    verdict = "all correct" if result["all_states_correct"] else "WRONG STATES"
    states = ", ".join(f"{kind} {ok}/{total}" for kind, (ok, total) in result["states"].items())
    print(f"states: {verdict} ({states})")
    for row in result.get("top_statements", []):
        print(f"  {row['total_ms']:>10} ms {row['calls']:>7} calls  {row['query']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--database-url", help="an empty DLQ database to use (default: a throwaway embedded cluster)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--mix",
        choices=MIXES,
        default="standard",
        help="standard: the fixed mix of seven kinds; realistic: what ingest puts in the DLQ from a log damaged "
        "with the generator's whole damage mix",
    )
    parser.add_argument("--repeat", type=int, default=3, help="alternated engine and ceiling runs (medians reported)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the ceiling run")
    parser.add_argument("--synchronous-commit", choices=("on", "off"), help="set for the benchmark database's sessions")
    parser.add_argument("--lease-mode", choices=LEASE_MODES, default="transaction", help="the worker's lease mode")
    parser.add_argument("--floor", action="store_true", help="also time the engine's SQL alone (no Python work)")
    parser.add_argument("--sql-stats", action="store_true", help="print pg_stat_statements' top statements")
    parser.add_argument("--health", action="store_true", help="dlq_health latency and retention rows/s instead")
    parser.add_argument("--retention-batch-size", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if args.events < 1 or args.workers < 1 or args.repeat < 1:
        parser.error("--events, --workers and --repeat must be positive")
    if not 1 <= args.batch_size <= 100_000 or not 1 <= args.retention_batch_size <= 100_000:
        parser.error("--batch-size and --retention-batch-size must be between 1 and 100000 (a worker's batch limits)")
    with database(args.database_url) as url:
        if args.synchronous_commit:  # new sessions (workers, ceiling) pick it up; reset afterwards
            _set_database(url, "synchronous_commit", args.synchronous_commit)
        try:
            result = _run(args, url)
        finally:
            if args.synchronous_commit:
                _set_database(url, "synchronous_commit", None)
    _print_human(result)
    if args.json:
        print(json.dumps(result, default=str), flush=True)
    return 0 if result.get("all_states_correct", True) else 1


def _set_database(url: str, name: str, value: str | None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        database, setting = sql.Identifier(conn.info.dbname), sql.Identifier(name)
        if value is None:
            conn.execute(sql.SQL("ALTER DATABASE {} RESET {}").format(database, setting))
        else:
            conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(database, setting, sql.Literal(value)))


def _run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    if args.health:
        return health(
            url, events=args.events, retention_batch_size=args.retention_batch_size, seed=args.seed, mix=args.mix
        )
    return benchmark(
        url,
        events=args.events,
        workers=args.workers,
        batch_size=args.batch_size,
        seed=args.seed,
        ceiling=not args.no_ceiling,
        floor=args.floor,
        sql_stats=args.sql_stats,
        lease_mode=args.lease_mode,
        repeat=args.repeat,
        mix=args.mix,
    )


if __name__ == "__main__":
    sys.exit(main())
