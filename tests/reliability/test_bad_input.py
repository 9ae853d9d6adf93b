"""Bad input: fuzzed logs through the reader, routing, repair and stitching; hostile records, text and arguments
through the real ingest, worker, SQL functions and CLI. Each gets a clear error or a safe, lossless store."""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dlq_assets.cli import main
from dlq_assets.core import jsonutil
from dlq_assets.core.cowrie import validate_event
from dlq_assets.core.intake.compressed import detect
from dlq_assets.core.intake.ingest import _RawRow, ingest_paths, is_cut_record, is_event, route
from dlq_assets.core.intake.reader import Record, read_file, read_records
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.handlers import HandlerRegistry
from dlq_assets.core.processing.pool import process
from dlq_assets.core.processing.worker import Worker
from dlq_assets.core.repair import Fragment, raw_bytes_of, repair_record, stitch_fragments
from dlq_assets.defs.processing.assets import dlq_processed_batches
from dlq_assets.defs.resources import CircuitBreaker, DLQDatabase
from dlq_assets.devtools.generator import generate_events
from tests.conftest import left_alone
from tests.reliability.conftest import (
    SCALE,
    VALID,
    assert_ledger_holds,
    insert_dead_letter,
    take_ledger,
)

pytestmark = pytest.mark.reliability

EVENTS = generate_events(40, seed=3)
LINES = [json.dumps(e, ensure_ascii=False).encode() for e in EVENTS]
PRETTY = [json.dumps(e, indent=2, ensure_ascii=False).encode() for e in EVENTS[:8]]
INSERTS = [b"\x00", b"\xff\xfe", b"\\u0000", b"\\ud800", b",", b"\\", b'"', b"}", b"{", b"]", b"[" * 600, b"\n{",
           b"\xc3", "☃ 🦠".encode(), b"\r\n", b"'; DROP TABLE dead_letter_events; --"]  # fmt: skip
FUZZ = settings(max_examples=500 * SCALE, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])
INJECTIONS = [
    "'; DROP TABLE dead_letter_events; --",
    "$$; DROP TABLE raw_events; $$",
    "$tag$ SELECT 1 $tag$",
    "\\'; SELECT pg_sleep(30); --",
    "%s %(id)s %% {0} {}",
    "' OR '1'='1' --",
    "x\\y\\\\z \\x00 \\u0000 \\\\'",
    "Robert'); DELETE FROM dlq_idempotency_keys; --",
    "☃ 🦠 \u202eevil\u202c e\u0301 \u2028\u2029 \U0010ffff 日本語",
    '"; `id` $(id) <script>alert(1)</script>',
]
BREAKER_NAME = re.compile(r"[!-~]([ -~]{0,62}[!-~])?")  # 1-64 printable ASCII (sql/functions/30_breaker.sql)
TABLES = ("dead_letter_events", "dlq_poison_events", "raw_events", "dlq_idempotency_keys", "dlq_processing_metrics",
          "dlq_circuit_breaker_state", "dlq_retry_policies", "dlq_health")  # fmt: skip


def tables_exist(conn: psycopg.Connection[Any]) -> bool:
    return all(conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] for t in TABLES)


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


# --- fuzzing: reader -> route -> repair / stitch ---------------------------------------------------------------


@st.composite
def damaged_logs(draw: st.DrawFn) -> bytes:
    """A few Cowrie records: whole, pretty-printed, split by stray newlines, cut short, with junk, NULs,
    invalid UTF-8, deep brackets or injection text inserted anywhere (byte positions: mid-character too)."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        data = draw(st.sampled_from(LINES + PRETTY))
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(data)))
            op = draw(st.sampled_from(("split", "cut", "insert", "junk")))
            if op == "split":
                data = data[:at] + b"\n" + data[at:]
            elif op == "cut":
                data = data[:at]
            elif op == "insert":
                data = data[:at] + draw(st.sampled_from(INSERTS)) + data[at:]
            else:
                data = draw(st.binary(max_size=40))
        parts.append(data + draw(st.sampled_from((b"\n", b"\r\n", b"\n\n", b" \n"))))
    return b"".join(parts)


def stored(record: Record) -> tuple[Any, str | None]:
    """What ingest keeps of a record: its payload and form, as the worker reads them back."""
    routed = route(record)
    if isinstance(routed, _RawRow):
        return routed.event, None
    return routed.payload, routed.metadata["payload_form"]


def assert_routed_soundly(record: Record) -> None:
    routed = route(record)
    if isinstance(routed, _RawRow):  # raw_events only ever gets valid, storable events
        assert validate_event(routed.event).valid
        assert jsonutil.loads(jsonutil.canonical_json(routed.event)) == routed.event
        assert routed.original_text == (None if record.ok else record.raw.decode("utf-8"))
        return
    text = jsonutil.canonical_json(routed.payload)
    jsonutil.loads(text)  # storable as jsonb
    form = routed.metadata["payload_form"]
    if form == "json":
        assert record.ok and routed.payload == record.value
    else:
        assert raw_bytes_of(routed.payload, form) == record.raw  # lossless, byte for byte
    assert 1 <= routed.priority <= 10 and routed.reason
    repaired = repair_record(raw_bytes_of(routed.payload, form))  # the worker's first step on it
    assert repaired.event is None or validate_event(repaired.event).valid


@FUZZ
@given(data=damaged_logs(), chunk_size=st.integers(1, 100))
def test_every_fuzzed_record_is_routed_to_one_sound_place(data: bytes, chunk_size: int) -> None:
    records = list(read_records(io.BytesIO(data), chunk_size=chunk_size))
    for record in records:
        assert data[record.offset : record.offset + len(record.raw)] == record.raw
        assert_routed_soundly(record)


@st.composite
def split_events(draw: st.DrawFn) -> tuple[bytes, list[dict[str, Any]], bool]:
    """One to three events, each cut by one to four stray line breaks anywhere; maybe damaged as well."""
    chosen = draw(st.lists(st.integers(0, len(EVENTS) - 1), min_size=1, max_size=3))
    damaged = draw(st.booleans())
    parts = []
    for i in chosen:
        data = draw(st.sampled_from((LINES[i], json.dumps(EVENTS[i], indent=2, ensure_ascii=False).encode())))
        for at in sorted(draw(st.sets(st.integers(1, len(data) - 1), min_size=1, max_size=4)), reverse=True):
            data = data[:at] + draw(st.sampled_from((b"\n", b"\n", b"\r\n"))) + data[at:]
        if damaged:
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.sampled_from(INSERTS)) + data[at + draw(st.integers(0, 3)) :]
        parts.append(data + b"\n")
    return b"".join(parts), [EVENTS[i] for i in chosen], damaged


@FUZZ
@given(case=split_events())
def test_stitching_fuzzed_fragments_never_raises_and_never_misrepairs(
    case: tuple[bytes, list[dict[str, Any]], bool],
) -> None:
    data, originals, damaged = case
    fragments = []
    for record in read_records(io.BytesIO(data)):
        payload, form = stored(record)
        if form is not None:  # a dead letter, read back as the worker reads it
            fragments.append(Fragment(record.offset, record.offset, raw_bytes_of(payload, form)))
    by_key = {f.key: i for i, f in enumerate(sorted(fragments, key=lambda f: f.offset))}
    used: set[int] = set()
    for stitched in stitch_fragments(fragments):
        assert validate_event(stitched.event).valid
        positions = [by_key[k] for k in stitched.keys]
        assert positions == list(range(positions[0], positions[0] + len(positions)))  # consecutive fragments
        assert used.isdisjoint(stitched.keys)
        used.update(stitched.keys)
        if not damaged:  # only stray line breaks: a stitched event is exactly one that was written
            assert jsonutil.canonical_json(stitched.event) in {jsonutil.canonical_json(e) for e in originals}


@settings(
    max_examples=40 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=damaged_logs())
def test_fuzzed_logs_are_ingested_once_and_losslessly(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, data: bytes
) -> None:
    assume(detect(data) is None)  # a compression format's magic bytes first: read as that (test_compressed.py)
    path = tmp_path / f"{uuid.uuid4().hex}.json"
    path.write_bytes(data)
    left_alone(path)  # a finished file: one being written keeps its cut end for the next ingest
    report = ingest_paths([path], url=db_url)
    records = list(read_file(path, accept=is_event, is_cut=is_cut_record))
    assert report.records == len(records) == report.raw_inserted + report.dlq_inserted
    raw_rows = conn.execute(
        "SELECT source_offset, payload::text, original_text FROM raw_events WHERE source = %s", (str(path),)
    )
    raw = {offset: (text, original) for offset, text, original in raw_rows}
    dead_rows = conn.execute(
        "SELECT source_offset, payload, metadata_json ->> 'payload_form' FROM dead_letter_events WHERE source = %s",
        (str(path),),
    )
    dead = {offset: (payload, form) for offset, payload, form in dead_rows}
    assert len(raw) + len(dead) == len(records)
    for record in records:
        payload, form = stored(record)
        if form is None:
            assert raw[record.offset] == (jsonutil.canonical_json(payload), None if record.ok else record.raw.decode())
        elif form == "json":
            assert dead[record.offset] == (json.loads(record.raw), "json")
        else:
            assert raw_bytes_of(*dead[record.offset]) == record.raw


# --- hostile records through the real ingest and worker ---------------------------------------------------------


def line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode()


COMMAND = {**VALID, "eventid": "cowrie.command.input", "input": "uname -a"}
TEN_MB = 10 * 1024 * 1024
HOSTILE: list[tuple[str, bytes, str]] = [  # name, record, where it must end: "raw" or the dead-letter reason
    ("nul_escape_in_valid_event", line({**COMMAND, "input": "a\x00b"}), "raw"),
    ("nul_escape_in_invalid_event", line({"eventid": "nope", "x": "\x00"}), "not_storable_json"),
    ("raw_nul_byte", line(COMMAND)[:-2] + b'\x00"}', "nul_byte"),
    ("invalid_utf8", line(COMMAND)[:-2] + b'\xff\xfe"}', "invalid_utf8"),
    ("lone_surrogate_escape", line(COMMAND)[:-2] + b'\\ud800"}', "not_storable_json"),
    ("deep_arrays", b"[" * 100_000 + b"]" * 100_000, "too_deeply_nested"),
    ("deep_objects", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "too_deeply_nested"),
    ("deep_inside_an_event", line(COMMAND)[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "too_deeply_nested"),
    ("ten_megabytes", line({**COMMAND, "input": "A" * TEN_MB}), "record_too_large"),
    ("injection_in_input", line({**COMMAND, "input": " ".join(INJECTIONS)}), "raw"),
    ("injection_in_session", line({**COMMAND, "session": INJECTIONS[0]}), "validation_failed"),
    ("unicode_and_escapes", line({**COMMAND, "input": INJECTIONS[8], "username": "ü\\n\\\\"}), "raw"),
]  # fmt: skip


@pytest.mark.timeout(300)
def test_hostile_records_are_stored_losslessly_and_processed_without_a_crash(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "hostile.json"
    offsets = {}
    with path.open("wb") as out:
        for name, record, _ in HOSTILE:
            offsets[name] = out.tell()
            out.write(record + b"\n")
    ingest_paths([path], url=db_url)
    source = str(path.resolve())
    for name, record, where in HOSTILE:
        offset = offsets[name]
        if where == "raw":
            text, original = conn.execute(
                "SELECT payload::text, original_text FROM raw_events WHERE source = %s AND source_offset = %s",
                (source, offset),
            ).fetchone()
            value = json.loads(record)
            if original is None:
                assert text == jsonutil.canonical_json(value), name  # the event, byte for byte
            else:
                assert original == record.decode("utf-8"), name  # what jsonb cannot hold is kept as written
            continue
        rows = conn.execute(
            "SELECT reason, payload, metadata_json ->> 'payload_form', classification FROM dead_letter_events "
            "WHERE source = %s AND source_offset >= %s AND source_offset < %s ORDER BY source_offset",
            (source, offset, offset + len(record)),
        ).fetchall()
        assert {r[0] for r in rows} == {where}, name
        kept = b"".join(raw_bytes_of(p, f) if f != "json" else json.dumps(p).encode() for _, p, f, _ in rows)
        assert kept == record or (rows[0][2] == "json" and rows[0][1] == json.loads(record)), name
        if name == "ten_megabytes":
            assert len(rows) == 2  # cut at the 8 MiB record cap, and nothing lost
        if name == "injection_in_session":
            assert rows[0][3] == "malicious"
    assert tables_exist(conn)

    before = take_ledger(db_url)
    report = process(db_url, WorkerConfig(batch_size=50, min_batch_size=10, max_batch_size=50))
    assert report.claimed >= len(before.events) - 1  # all but the malicious one, which is the owner's to see
    assert_ledger_holds(before, take_ledger(db_url))
    errors = conn.execute(
        "SELECT DISTINCT h ->> 'error_class' FROM dead_letter_events, jsonb_array_elements(error_history) h"
    ).fetchall()
    assert {e for (e,) in errors} <= {"unrepairable", "invalid_event"}  # refused as data, never a crash


# --- hostile text in every field a user controls -------------------------------------------------------------


def test_hostile_text_round_trips_through_every_path(db_url: str, conn: psycopg.Connection) -> None:
    ids = {}
    for i, text in enumerate(INJECTIONS):
        role = "dlq_processor_role" if i % 2 else None  # the processor inserts dead letters too
        if role:
            conn.execute("SET ROLE dlq_processor_role")
        try:
            ids[text] = insert_dead_letter(
                conn, {**VALID, "note": text}, reason=text, source=text, source_inode=text, source_offset=i,
                metadata_json=psycopg.types.json.Jsonb({"note": text}),
            )  # fmt: skip
        finally:
            conn.execute("RESET ROLE")
    with pytest.raises(psycopg.DataError, match="NUL"):  # the one character text cannot hold: a clear error
        insert_dead_letter(conn, VALID, reason="nul\x00byte")
    for text, event_id in ids.items():
        row = conn.execute(
            "SELECT reason, source, source_inode, payload ->> 'note', metadata_json ->> 'note', "
            "convert_to(reason, 'UTF8') FROM dead_letter_events WHERE id = %s",
            (event_id,),
        ).fetchone()
        assert row == (text, text, text, text, text, text.encode("utf-8"))
        claimed = conn.execute("SELECT id, processing_lock FROM dlq_claim_events(100, 60, NULL, %s)", (text,))
        ((claimed_id, lease),) = claimed.fetchall()
        assert claimed_id == event_id  # the reason filter matched exactly its own row
        conn.execute("SELECT * FROM dlq_complete_batch(%s, %s, %s)", (lease, [event_id], ["released"]))

    # Poisoned with their reason intact, redriven by reason from the CLI, then processed with the text as
    # the worker's reason filter and breaker name.
    Worker(db_url, WorkerConfig(batch_size=100, min_batch_size=10), HandlerRegistry(default=None)).run()
    assert conn.execute("SELECT count(*) FROM dlq_poison_events").fetchone() == (len(INJECTIONS),)
    for text, event_id in ids.items():
        assert cli("--database-url", db_url, "redrive", "--reason", text, "--dry-run")[0] == 0
        code, out = cli("--database-url", db_url, "redrive", "--reason", text, "--json")
        assert code == 0 and json.loads(out)["redriven"] == [event_id]
        breaker = text[:64]
        if not BREAKER_NAME.fullmatch(breaker):  # a name that reaches terminals and the UI: refused, clearly
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="breaker name"):
                Worker(db_url, WorkerConfig(batch_size=100, min_batch_size=10, breaker_name=breaker)).run()
            breaker = "dlq_processing"
        config = WorkerConfig(batch_size=100, min_batch_size=10, reason=text, breaker_name=breaker)
        report = Worker(db_url, config).run()
        assert (report.claimed, report.resolved) == (1, 1)
        target = conn.execute("SELECT source, source_inode FROM raw_events WHERE dlq_event_id = %s", (event_id,))
        assert target.fetchone() == (text, text)
        assert conn.execute(
            "SELECT count(*) FROM dlq_circuit_breaker_state WHERE breaker_name = %s", (breaker,)
        ).fetchone() == (1,)
        code, out = cli("--database-url", db_url, "inspect", str(event_id), "--json")
        assert code == 0 and json.loads(out)["reason"] == text and json.loads(out)["payload"]["note"] == text
        assert conn.execute("SELECT * FROM process_dlq_events_enhanced(10, %s, NULL, %s)", (text, breaker)).fetchone()
    code, out = cli("--database-url", db_url, "analyze", "--json")
    assert code == 0 and {r["reason"] for r in json.loads(out)["by_reason"]} == set(INJECTIONS)
    assert tables_exist(conn)
    assert conn.execute("SELECT count(*) FROM dlq_idempotency_keys").fetchone() == (len(INJECTIONS),)


def test_hostile_classifications_round_trip_or_fail_clearly(conn: psycopg.Connection) -> None:
    event_id = insert_dead_letter(conn, VALID)
    conn.execute("SET ROLE security_admin")
    try:
        for text in INJECTIONS:
            if len(text) <= 32:
                conn.execute("UPDATE dead_letter_events SET classification = %s WHERE id = %s", (text, event_id))
                assert conn.execute(
                    "SELECT classification FROM dead_letter_events WHERE id = %s", (event_id,)
                ).fetchone() == (text,)
            else:
                with pytest.raises(psycopg.errors.StringDataRightTruncation):
                    conn.execute("UPDATE dead_letter_events SET classification = %s WHERE id = %s", (text, event_id))
    finally:
        conn.execute("RESET ROLE")
    conn.execute("SET ROLE dlq_processor_role")
    try:  # none of them is 'malicious': the row stays visible to the processor
        assert conn.execute("SELECT id FROM dead_letter_events").fetchall() == [(event_id,)]
    finally:
        conn.execute("RESET ROLE")
    assert tables_exist(conn)


def test_hostile_cli_arguments_get_a_clear_error_or_do_no_harm(db_url: str, conn: psycopg.Connection) -> None:
    insert_dead_letter(conn, VALID)
    for text in INJECTIONS:
        code, out = cli("--database-url", db_url, "redrive", "--reason", text, "--dry-run")
        assert (code, out) == (0, "would redrive 0 events; kept 0 (redriven 3 times already)\n")
        code, out = cli("--database-url", db_url, "process", "--reason", text, "--json")
        assert code == 0 and json.loads(out)["claimed"] == 0
        code, out = cli("--database-url", db_url, "breaker", "status", "--name", text, "--json")
        assert code == 0 and json.loads(out)["breaker_name"] == text
    for args in (("inspect", "1; drop"), ("cleanup", "--older-than-days", "0; DROP TABLE raw_events"),
                 ("analyze", "--since-hours", "1' OR '1'='1"), ("process", "--limit", "$$")):  # fmt: skip
        code, out = cli("--database-url", db_url, *args)
        assert code == 2 and "Invalid value" in out, args
    code, out = cli("--database-url", db_url, "breaker", "status", "--name", "x" * 65, "--json")
    assert code == 0 and json.loads(out)["exists"] is False  # status only reads: no such breaker
    code, out = cli("--database-url", db_url, "breaker", "reset", "--name", "x" * 65)
    assert code == 1 and out.startswith("error: ") and len(out.splitlines()) == 1 and "breaker name" in out
    code, out = cli("--database-url", db_url.rsplit("/", 1)[0] + "/x'; DROP DATABASE postgres; --", "health")
    assert code == 1 and out.startswith("error: ") and len(out.splitlines()) == 1
    assert tables_exist(conn)
    assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE NOT resolved").fetchone() == (1,)


def test_hostile_file_names_are_kept_exactly_or_refused_clearly(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    for text in INJECTIONS:
        path = tmp_path / (text.replace("/", "∕") + ".json")  # a file name cannot hold "/"
        path.write_bytes(line(COMMAND) + b"\ngarbage\n")
        code, out = cli("--database-url", db_url, "ingest", str(path), "--json")
        assert code == 0, out
        source = str(path.resolve())
        assert conn.execute("SELECT source FROM raw_events WHERE source = %s", (source,)).fetchone() == (source,)
        assert conn.execute("SELECT source FROM dead_letter_events WHERE source = %s", (source,)).fetchone() == (
            source,
        )
    raw_before = conn.execute("SELECT count(*) FROM raw_events").fetchone()
    undecodable = os.fsencode(tmp_path) + b"/bad-\xff\xfe.json"  # a name that is not UTF-8
    with open(undecodable, "wb") as out:
        out.write(line(COMMAND) + b"\ngarbage\n")
    code, out = cli("--database-url", db_url, "ingest", os.fsdecode(undecodable))
    (error,) = [text for text in out.splitlines() if "error" in text]  # the rest is the progress bar's label
    assert code == 1 and error.startswith("error: ") and "Traceback" not in out
    assert "not valid UTF-8" in error and "bad-" in error  # says which file and why
    assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == raw_before  # nothing half-stored
    assert tables_exist(conn)


def test_hostile_config_values_do_no_harm(db_url: str, conn: psycopg.Connection) -> None:
    for i, text in enumerate(INJECTIONS[:3]):
        insert_dead_letter(conn, {**VALID, "n": i}, reason=text)
    result = dg.materialize(
        [dlq_processed_batches],
        resources={"database": DLQDatabase(url=db_url), "breaker": CircuitBreaker(name=INJECTIONS[1])},
        run_config={"ops": {"dlq_processed_batches": {"config": {"reason": INJECTIONS[0]}}}},
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("dlq_processed_batches")
    assert materialization.metadata["repaired"].value == 1  # exactly the one with that reason
    assert conn.execute("SELECT breaker_name FROM dlq_circuit_breaker_state").fetchall() == [(INJECTIONS[1],)]
    with pytest.raises(psycopg.DataError, match="NUL"):
        process(db_url, WorkerConfig(reason="nul\x00"))
    assert tables_exist(conn)
