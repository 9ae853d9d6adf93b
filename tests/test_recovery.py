"""Recovery end to end: damaged logs ingested, processed twice, and every event compared with what was written.

Each corpus is scored against the generator's ground truth, position by position: an event in ``raw_events``
at a record's offset must equal the original (exact), a recoverable record with no event there is a miss, an
event at an offset no record starts at is invented, two events for one record are a duplicate, and a record
with neither an event nor an unresolved dead letter covering it is lost.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from dlq_assets.core import jsonutil
from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.pool import process
from dlq_assets.devtools.generator import KINDS, TruthRecord, write_corrupted_log

from .conftest import SHARED_REFERENCE

CONFIG = WorkerConfig(batch_size=500, min_batch_size=100, max_batch_size=1000)
MIN_EXACT_SHARE = 0.98


def score(conn: psycopg.Connection, source: Path, truth: Sequence[TruthRecord]) -> Counter[str]:
    """Counts of exact, wrong, missed, invented, duplicated and lost records (see the module docstring)."""
    name = str(source.resolve())
    events = conn.execute(
        "SELECT source_offset, payload::text, partial, repair_strategy FROM raw_events WHERE source = %s", (name,)
    ).fetchall()
    unresolved = conn.execute(
        """
        SELECT source_offset, (metadata_json ->> 'record_bytes')::bigint FROM dead_letter_events
         WHERE source = %(s)s AND NOT resolved
        UNION ALL
        SELECT source_offset, (metadata_json ->> 'record_bytes')::bigint FROM dlq_poison_events WHERE source = %(s)s
        """,
        {"s": name},
    ).fetchall()
    starts = [t.offset for t in truth]
    by_record: dict[int, list[tuple[str, bool, str | None]]] = {}
    counts: Counter[str] = Counter()
    for offset, payload, partial, strategy in events:
        index = bisect.bisect_right(starts, offset) - 1
        if index < 0 or starts[index] != offset:
            counts["invented"] += 1
            continue
        by_record.setdefault(index, []).append((payload, partial, strategy))
        counts["partial_flag_wrong"] += partial != (strategy == "truncation_closed")
    for index, record in enumerate(truth):
        found = by_record.get(index, [])
        damaged = record.corruption != "clean"
        counts["records"] += 1
        counts["recoverable"] += record.recoverable
        counts["damaged_recoverable"] += record.recoverable and damaged
        if len(found) > 1:
            counts["duplicated"] += 1
        if found:
            payload, partial, _ = found[0]
            exact = payload == jsonutil.canonical_json(record.original)
            verdict = "exact" if exact else "partial" if partial and _holds_part_of(payload, record) else "wrong"
            counts[verdict] += 1
            counts[f"{verdict}:{record.corruption}"] += 1
            counts["damaged_exact"] += exact and damaged
            counts["exact_but_not_recoverable"] += exact and not record.recoverable
            continue
        counts[f"missed:{record.corruption}" if record.recoverable else "left"] += 1
        counts["missed"] += record.recoverable
        covered = any(start <= record.offset < start + (size or 0) for start, size in unresolved)
        counts["lost"] += not covered
    return counts


def _holds_part_of(payload: str, record: TruthRecord) -> bool:
    """A partial event (a cut record closed) holds some of the original's attributes, each with its value."""
    event, original = jsonutil.loads(payload), jsonutil.loads(jsonutil.canonical_json(record.original))
    return all(key in original and original[key] == value for key, value in event.items())


def run(url: str, log: Path, truth: Sequence[TruthRecord], conn: psycopg.Connection) -> Counter[str]:
    ingest_paths([log], url=url)
    process(url, CONFIG)
    process(url, CONFIG)  # the second run finds only what is due (none: what is left waits for its backoff)
    counts = score(conn, log, truth)
    states = conn.execute(
        """
        SELECT count(*) FILTER (WHERE num_nonnulls(nullif(resolved, false), processing_lock, quarantined_at) > 1)
          FROM dead_letter_events
        """
    ).fetchone()[0]
    counts["dead_letters_in_two_states"] = states
    return counts


def report(counts: Counter[str]) -> str:
    share = counts["exact"] / counts["recoverable"] if counts["recoverable"] else 1.0
    return (
        f"records={counts['records']} recoverable={counts['recoverable']} exact={counts['exact']} ({share:.2%}) "
        f"partial={counts['partial']} wrong={counts['wrong']} missed={counts['missed']} invented={counts['invented']} "
        f"duplicated={counts['duplicated']} lost={counts['lost']} left={counts['left']}\n  "
        + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if ":" in k)
    )


def assert_recovered(counts: Counter[str]) -> None:
    text = report(counts)
    assert counts["wrong"] == counts["invented"] == counts["duplicated"] == counts["lost"] == 0, text
    assert counts["partial_flag_wrong"] == counts["dead_letters_in_two_states"] == 0, text
    assert counts["exact_but_not_recoverable"] == 0, text  # the truth says it could not be rebuilt: check both
    assert counts["exact"] >= MIN_EXACT_SHARE * counts["recoverable"], text


@pytest.mark.parametrize("seed", [101, 202, 303])
def test_generated_corpora_give_back_what_their_bytes_hold(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, seed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "cowrie.json"
    truth = write_corrupted_log(log, n_events=3000, seed=seed, corruption_rate=0.35, bom=seed % 2 == 1)
    counts = run(db_url, log, truth, conn)
    with capsys.disabled():
        print(f"\nseed {seed}: {report(counts)}")
    assert counts["records"] >= 3000
    assert_recovered(counts)
    damaged = {t.corruption for t in truth if t.recoverable and t.corruption != "clean"}
    assert {k for k in damaged if counts[f"exact:{k}"] == 0} == set()  # every recoverable kind came back
    assert len({t.corruption for t in truth}) >= len(KINDS)  # every kind was drawn


def test_the_real_honeypots_logs_damaged_give_back_what_their_bytes_hold(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    days = sorted((SHARED_REFERENCE / "real-cowrie").glob("cowrie.json.*"))
    if not days:
        pytest.skip("the real Cowrie logs are not beside this checkout (../shared/reference/real-cowrie)")
    total: Counter[str] = Counter()
    for seed, day in enumerate(days):
        with day.open(encoding="utf-8") as lines:
            events = [json.loads(text, parse_float=Decimal) for text in lines if text.strip()]
        log = tmp_path / f"damaged-{day.name}"
        truth = write_corrupted_log(log, n_events=1500, seed=seed, corruption_rate=0.35, events=events)
        total.update(run(db_url, log, truth, conn))
    with capsys.disabled():
        print(f"\nreal logs, damaged: {report(total)}")
    assert_recovered(total)


def _dead_letter(conn: psycopg.Connection, log: Path, offset: int, raw: bytes, reason: str) -> None:
    """One line stored whole, as a line-based reader stores it: the text at its offset, wrapped losslessly."""
    text = raw.decode("utf-8")
    conn.execute(
        "INSERT INTO dead_letter_events (source, source_inode, source_offset, reason, payload, metadata_json) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (
            str(log.resolve()),
            str(log.stat().st_ino),
            offset,
            reason,
            json.dumps({"raw_text": text}),
            json.dumps({"payload_form": "raw_text", "record_bytes": len(raw), "errors": []}),
        ),
    )


def test_dead_letters_an_earlier_reader_stored_are_recovered_on_their_next_attempt(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    events = [json.loads(line) for line in _REAL_LINES]
    one = [jsonutil.canonical_json(e).encode() for e in events]
    split_value = events[2]["message"]
    newline_event = {**events[2], "message": split_value[:4] + "\n" + split_value[4:]}
    first, second = one[2].split(split_value[4:].encode(), 1)
    lines = [
        one[0] + one[1],  # two events on one line: one dead letter, trailing data
        repr(events[3]).encode(),  # a Python literal
        b"\xef\xbb\xbf" + one[4],  # a byte-order mark before the record
        first,  # a raw newline in a string, read as two fragments
        split_value[4:].encode() + second,
        one[5][:-1],  # cut right before its closing brace
    ]
    log = tmp_path / "cowrie.json"
    log.write_bytes(b"\n".join(lines) + b"\n")
    offsets = [sum(len(x) + 1 for x in lines[:k]) for k in range(len(lines))]
    for offset, raw in zip(offsets, lines, strict=True):
        _dead_letter(conn, log, offset, raw, "json_parse_error")
    report_ = process(db_url, CONFIG)
    assert report_.resolved == len(lines) and report_.failed == 0
    found = conn.execute(
        "SELECT source_offset, payload::text, repair_strategy, partial FROM raw_events ORDER BY source_offset"
    ).fetchall()
    assert found == [
        (offsets[0], jsonutil.canonical_json(events[0]), "split", False),
        (offsets[0] + len(one[0]), jsonutil.canonical_json(events[1]), "split", False),
        (offsets[1], jsonutil.canonical_json(events[3]), "python_literal", False),
        (offsets[2] + 3, jsonutil.canonical_json(events[4]), "bom_skipped", False),
        (offsets[3], jsonutil.canonical_json(newline_event), "stitch", False),
        (offsets[5], jsonutil.canonical_json(events[5]), "truncation_closed", True),
    ]
    methods = conn.execute("SELECT resolution_method, count(*) FROM dead_letter_events GROUP BY 1").fetchall()
    assert dict(methods) == {
        "repair:split": 1,
        "repair:python_literal": 1,
        "repair:bom_skipped": 1,
        "repair:stitch": 2,
        "repair:truncation_closed": 1,
    }
    # The same log read again by ingest's record reader: every event it finds is at a position already written.
    again = ingest_paths([log], url=db_url)
    assert again.raw_inserted == 0 and again.dlq_inserted == 0
    assert conn.execute("SELECT count(*) FROM raw_events").fetchone()[0] == len(found)


_REAL_LINES = [
    '{"eventid": "cowrie.session.connect", "src_ip": "121.18.238.115", "src_port": 53500, "timestamp": '
    '"2018-05-09T00:06:12.624076Z", "message": "New connection: 121.18.238.115:53500 (172.17.0.3:2222) [session: '
    '6c54accd90dd]", "dst_ip": "172.17.0.3", "protocol": "ssh", "session": "6c54accd90dd", "dst_port": 2222, '
    '"sensor": "920497a79896"}',
    '{"eventid": "cowrie.client.version", "session": "6c54accd90dd", "message": "Remote SSH version: SSH-2.0-PUTTY",'
    ' "src_ip": "121.18.238.115", "version": "SSH-2.0-PUTTY", "sensor": "920497a79896", "timestamp": '
    '"2018-05-09T00:06:12.841907Z"}',
    '{"eventid": "cowrie.login.failed", "username": "root", "password": "admin", "message": "login attempt '
    '[root/admin] failed", "sensor": "920497a79896", "timestamp": "2018-05-09T00:06:13.1Z", "src_ip": '
    '"121.18.238.115", "session": "6c54accd90dd"}',
    '{"eventid": "cowrie.session.file_download", "url": "http://198.51.100.7/x", "outfile": "var/lib/cowrie/d/a", '
    '"shasum": "' + "a" * 64 + '", "duplicate": true, "message": "it\'s \\"x\\"", "sensor": "920497a79896", '
    '"timestamp": "2018-05-09T00:06:14.1Z", "src_ip": "121.18.238.115", "session": "6c54accd90dd"}',
    '{"eventid": "cowrie.command.input", "input": "uname -a", "message": "CMD: uname -a", "sensor": "920497a79896", '
    '"timestamp": "2018-05-09T00:06:15.1Z", "src_ip": "121.18.238.115", "session": "6c54accd90dd"}',
    '{"eventid": "cowrie.session.closed", "duration": 1.1534101963043213, "message": "Connection lost after 1 '
    'seconds", "sensor": "920497a79896", "timestamp": "2018-05-09T00:06:16.1Z", "src_ip": "121.18.238.115", '
    '"session": "6c54accd90dd"}',
]


def test_text_that_only_looks_like_events_never_becomes_one(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    """An attacker's input inside another producer's record, a nested event in a cut one, a number no numeric
    holds, NULs where they change meaning: none of it reaches raw_events as an event of its own."""
    command = json.loads(_REAL_LINES[4])
    forged = json.loads(_REAL_LINES[2])
    forged_text = json.dumps({**forged, "src_ip": "6.6.6.6"})
    in_repr = {**command, "input": "x}" + forged_text + "{"}
    cut_repr = repr({**command, "input": "echo '" + forged_text})[:-2]  # cut right after the embedded JSON
    nested_in_cut = '{"eventid": "cowrie.direct-tcpip.data", "wrapped": ' + forged_text
    huge = _REAL_LINES[4][:-1] + ', "v": 1e999999999, "m": "\\u0000"}'
    nul_key = _REAL_LINES[4][:-1] + ', "user\\u0000name": "admin"}'
    nul_id = _REAL_LINES[4].replace("cowrie.command.input", "cowrie.command.in\\u0000put")
    lines = [repr(in_repr), cut_repr, nested_in_cut, huge, nul_key, nul_id]
    log = tmp_path / "cowrie.json"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report_ = ingest_paths([log], url=db_url)
    assert report_.records == len(lines) and report_.raw_inserted == 0
    process(db_url, CONFIG)
    stored = conn.execute("SELECT source_offset, payload::text, repair_strategy FROM raw_events").fetchall()
    assert stored == [(0, jsonutil.canonical_json(in_repr), "python_literal")]  # the repr, read whole
    assert conn.execute("SELECT count(*) FROM raw_events WHERE src_ip = '6.6.6.6'").fetchone() == (0,)
