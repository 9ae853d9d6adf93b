"""The write paths of ingest on a real server: COPY where no earlier read of a file reached, the insert path
elsewhere, the insert path again when a COPY meets a stored position, and files ingested in processes. Whichever
path writes a batch, the rows are the same and every record lands in exactly one place."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import set_json_loads

from dlq_assets.core import jsonutil
from dlq_assets.core.intake import ingest
from dlq_assets.core.intake.compressed import open_log
from dlq_assets.core.intake.ingest import IngestReport, ingest_paths
from dlq_assets.core.intake.reader import read_records
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.worker import Worker
from dlq_assets.devtools.generator import write_corrupted_log
from tests.cli.test_cli import run
from tests.conftest import at_once, left_alone
from tests.core.intake.test_ingest import CONNECT, dumps, rows, write_log

TABLES = ("raw_events", "dead_letter_events")
# Columns a run sets on its own (serials, clocks, the run's id): everything else must not depend on the path.
PER_RUN = frozenset({"id", "created_at", "updated_at", "ingest_id", "ingested_at", "next_attempt_at"})
# Compared between two ingests of the same files.
REPORT_NUMBERS = ("files", "records", "raw_inserted", "raw_duplicates", "dlq_inserted", "dlq_duplicates",
                  "sanitized", "boms_skipped", "duplicate_keys", "dlq_reasons", "compressed_files")  # fmt: skip

# Records whose COPY text needs escapes or whose columns the server parses (timestamps with offsets, IPv6, numbers
# in exponent form), appended to generated logs.
PRETTY_DUPLICATE = (
    '{\r\n\t"eventid": "cowrie.session.connect",\r\n\t"message": "first",\r\n\t"message": "last\\\\",\r\n'
    '\t"timestamp": "2024-01-15T10:30:00+0530",\r\n\t"session": "3f2a9c0b1d4e"\r\n}'
)
# A file name COPY text must escape (backslash, tab, newline, the NULL marker).
HOSTILE_NAME = "co\\w\trie\n\\N ü.json"
TRICKY = (
    PRETTY_DUPLICATE,
    dumps({**CONNECT, "message": "nul\x00 tab\t back\\slash \\. \u2028 ✓", "timestamp": "2024-01-15T10:30:00.5-08:00"}),
    dumps({**CONNECT, "src_ip": "::ffff:192.0.2.1", "timestamp": "2024-02-29T23:59:59.999999+15:59"}),
    '{"eventid": "cowrie.session.connect", "timestamp": "2024-01-15T10:30:00Z", "session": "3f2a9c0b", '
    '"src_port": 5.0e4, "dst_port": 2.20e1, "x": -0.0, "y": 1E-7, "z": -0, "w": 1e2}',
    dumps({**CONNECT, "n": [int("9" * 4299), -int("9" * 4299), 0]})[:-1] + f', "m": -{"8" * 4300}, "k": {"7" * 4301}}}',
    dumps({"eventid": "cowrie.abuseipdb.wakeup", "timestamp": "2024-01-15T10:30:00Z", "src_ip": "203.0.113.9"}),
    '{"eventid": "cowrie.no.such\\t", "eventid": "x", "timestamp": "2024-01-15T10:30:00Z"}',
    "\\.",
    "tab\there\\ and \\N and \\r",
    b"latin1 \xe9\t\\",
)


def tricky_log(path: Path, seed: int, n_events: int = 600) -> Path:
    write_corrupted_log(path, n_events=n_events, seed=seed, corruption_rate=0.4)
    with path.open("ab") as out:
        out.write(b"".join((r.encode() if isinstance(r, str) else r) + b"\n" for r in TRICKY))
    return path


def records_of(path: Path) -> list[int]:
    """The offsets of the records ingest reads from a file (plain or compressed), in order."""
    with open_log(path) as stream:
        return [r.offset for r in read_records(stream, accept=ingest.is_event, is_cut=ingest.is_cut_record)]


def stored(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of both tables without the columns a run sets on its own, in (source, offset) order."""
    with psycopg.connect(url) as conn:
        set_json_loads(jsonutil.loads, conn)  # exact numbers, integers past Python's digit limit too
        return {t: [{k: v for k, v in row.items() if k not in PER_RUN} for row in rows(conn, t)] for t in TABLES}


def placed(url: str, key: str = "source") -> list[tuple[str, int]]:
    """(source, or another key column, offset) of every row of both tables, sorted: a record twice shows as a
    repeated pair."""
    with psycopg.connect(url) as conn:
        return sorted(
            conn.execute(f"SELECT {key}, source_offset FROM raw_events "
                         f"UNION ALL SELECT {key}, source_offset FROM dead_letter_events").fetchall()
        )  # fmt: skip


def expected(*paths: Path) -> list[tuple[str, int]]:
    return sorted((str(p.resolve()), offset) for p in paths for offset in records_of(p))


def numbers(report: IngestReport) -> dict[str, Any]:
    return {name: getattr(report, name) for name in REPORT_NUMBERS} | {
        "damaged_files": {tuple(sorted(d.items())) for d in report.damaged_files}
    }


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | str]]:
    """Each COPY the writer runs in this process, as (table, rows or "unique_violation"): which path wrote."""
    seen: list[tuple[str, int | str]] = []
    real = ingest._copy

    def spy(conn: psycopg.Connection[Any], statement: str, data: bytes) -> int:
        table = "raw_events" if "raw_events" in statement else "dead_letter_events"
        try:
            count = real(conn, statement, data)
        except psycopg.errors.UniqueViolation:
            seen.append((table, "unique_violation"))
            raise
        seen.append((table, count))
        return count

    monkeypatch.setattr(ingest, "_copy", spy)
    return seen


def force_insert_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "_unseen", lambda *args: False)


# --- one file, either path -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [3, 17, 29])
def test_copy_and_insert_paths_store_identical_rows(
    db_url: str, other_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copies: list[Any], seed: int
) -> None:
    """The COPY text is a second rendering of the insert path's rows: any escaping or parsing difference would
    make the same file store different rows depending on whether an earlier read reached it."""
    log = tricky_log(tmp_path / HOSTILE_NAME, seed)
    by_copy = ingest_paths([log], url=db_url, batch_size=37)
    assert {t for t, _ in copies} == set(TABLES) and all(isinstance(n, int) for _, n in copies)

    copies.clear()
    force_insert_path(monkeypatch)
    by_insert = ingest_paths([log], url=other_db_url, batch_size=37)
    assert copies == []

    assert numbers(by_copy) == numbers(by_insert)
    assert by_copy.records == by_copy.raw_inserted + by_copy.dlq_inserted
    assert by_copy.sanitized >= 1 and by_copy.duplicate_keys >= 2
    dump = stored(db_url)
    assert dump == stored(other_db_url)
    with psycopg.connect(db_url) as conn:  # the checksum is the server's own of the payload it stored
        assert conn.execute("SELECT count(*) FROM raw_events WHERE payload_checksum <> dlq_payload_checksum(payload)"
                            ).fetchone() == (0,)  # fmt: skip
    assert placed(db_url) == expected(log)
    pretty = next(r for r in dump["raw_events"] if r["original_text"] == PRETTY_DUPLICATE)
    assert pretty["duplicate_keys"] and pretty["payload"]["message"] == "last\\"


@pytest.mark.parametrize(
    "record", [dumps({**CONNECT, "message": "café"}), "café, not JSON"], ids=["event", "dead_letter"]
)
def test_copy_and_insert_paths_store_identical_rows_whatever_the_client_encoding(
    db_url: str, other_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: str
) -> None:
    """libpq takes the client encoding from PGCLIENTENCODING (or the URL, or the database's encoding): the insert
    path's parameters are encoded in it, so COPY text must be too."""
    log = write_log(tmp_path / "cowrie.json", record)
    with monkeypatch.context() as latin1:
        latin1.setenv("PGCLIENTENCODING", "LATIN1")
        ingest_paths([log], url=db_url)
        force_insert_path(latin1)
        ingest_paths([log], url=other_db_url)
    assert stored(db_url) == stored(other_db_url)  # read back in UTF8


# --- the same file again ---------------------------------------------------------------------------------------


def mixed_log(path: Path) -> Path:
    """20 dead letters, then events and dead letters alternating, then 20 dead letters: with batches of 10 the
    first two and last two batches hold no event, so a second read finds no event in their range and copies them."""
    garbage = [f"not json {i} {{" for i in range(20)]
    middle = [dumps({**CONNECT, "src_port": i}) if i % 2 else f"garbage {i}" for i in range(40)]
    return write_log(path, *garbage, *middle, *(g + "]" for g in garbage))


@pytest.mark.parametrize(
    ("make", "dead_only_batches"),
    [(mixed_log, 4), (lambda path: tricky_log(path, 5), 0)],
    ids=["dead_only_batches", "generated"],
)
def test_ingesting_the_same_file_again_inserts_nothing_and_counts_every_record_a_duplicate(
    db_url: str, tmp_path: Path, copies: list[Any], make: Any, dead_only_batches: int
) -> None:
    """A second read meets every record stored: COPY of a batch without events relies on the dead-letter insert
    trigger to skip known keys, and its row count must say so, or the report would claim rows it did not add."""
    log = make(tmp_path / "cowrie.json")
    first = ingest_paths([log], url=db_url, batch_size=10)
    before = stored(db_url)
    copies.clear()
    again = ingest_paths([log], url=db_url, batch_size=10)

    # a batch of dead letters only is copied, its rows skipped; a batch holding a stored event takes the insert path
    assert copies == [("dead_letter_events", 0)] * dead_only_batches
    assert (again.raw_inserted, again.dlq_inserted) == (0, 0)
    assert again.raw_duplicates + again.dlq_duplicates == again.records == first.records
    assert (again.raw_duplicates, again.dlq_duplicates) == (first.raw_inserted, first.dlq_inserted)
    assert again.dlq_reasons == first.dlq_reasons
    assert stored(db_url) == before
    assert placed(db_url) == expected(log)


@pytest.mark.parametrize("ends_with", ["events", "dead_letters"])
def test_a_file_that_grew_adds_only_its_appended_records(
    db_url: str, tmp_path: Path, copies: list[Any], ends_with: str
) -> None:
    """An appended file keeps its inode: the batch that spans the first read's end holds stored records (an event,
    so the insert path; or only dead letters, so COPY, the trigger skipping them) and appended ones, which alone
    are added."""
    event = dumps(CONNECT)
    lines = [event if i % 3 == 0 and (i < 20 or ends_with == "events") else f"junk {i}" for i in range(23)]
    log = write_log(tmp_path / "cowrie.json", *lines)
    inode = log.stat().st_ino
    first = ingest_paths([log], url=db_url, batch_size=10)
    first_placed = placed(db_url)
    appended = [event if i % 2 else f"more junk {i}" for i in range(24)]
    with log.open("ab") as out:
        out.write("".join(line + "\n" for line in appended).encode())
    assert log.stat().st_ino == inode

    copies.clear()
    again = ingest_paths([log], url=db_url, batch_size=10)
    appended_events = sum(1 for line in appended if line == event)
    assert again.records == len(lines) + len(appended)
    assert (again.raw_inserted, again.dlq_inserted) == (appended_events, len(appended) - appended_events)
    assert (again.raw_duplicates, again.dlq_duplicates) == (first.raw_inserted, first.dlq_inserted)
    assert placed(db_url) == expected(log)
    assert set(first_placed) <= set(placed(db_url))
    # batches 4 and 5 hold only appended lines; batch 3 (lines 20-29) is copied when its first 3 lines hold no event
    assert len(copies) == (6 if ends_with == "dead_letters" else 4)
    copied = {t: sum(n for table, n in copies if table == t) for t in TABLES}
    if ends_with == "dead_letters":  # every appended record copied, batch 3's stored dead letters skipped
        assert copied == {"raw_events": again.raw_inserted, "dead_letter_events": again.dlq_inserted}
    else:  # batch 3's appended records by the insert path
        assert copied["raw_events"] < again.raw_inserted and copied["dead_letter_events"] < again.dlq_inserted


def test_a_file_replaced_at_the_same_path_is_another_source_and_copied_whole(
    db_url: str, tmp_path: Path, copies: list[Any]
) -> None:
    """Rotation puts another file (another inode) at a path already read: no earlier read reached its positions."""
    log = mixed_log(tmp_path / "cowrie.json")
    first = ingest_paths([log], url=db_url, batch_size=10)
    replacement = tmp_path / "next"
    replacement.write_bytes(log.read_bytes())
    replacement.replace(log)
    copies.clear()
    again = ingest_paths([log], url=db_url, batch_size=10)
    assert (again.raw_inserted, again.dlq_inserted) == (first.raw_inserted, first.dlq_inserted)
    assert sum(n for t, n in copies if t == "raw_events") == again.raw_inserted
    assert sum(n for t, n in copies if t == "dead_letter_events") == again.dlq_inserted
    assert len(placed(db_url)) == 2 * len(records_of(log))


def test_a_last_record_read_half_written_ends_in_one_place_once_completed(db_url: str, tmp_path: Path) -> None:
    """The cut end of a file being written is held back, not stored as a truncated dead letter the whole event would
    later stand beside."""
    event = dumps(CONNECT)
    log = write_log(tmp_path / "cowrie.json", event)
    with log.open("ab") as out:
        out.write(event[:40].encode())
    first = ingest_paths([log], url=db_url)
    assert (first.records, first.raw_inserted, first.dlq_inserted) == (1, 1, 0)
    assert first.held_back == [{"path": str(log.resolve()), "offset": len(event) + 1, "bytes": 40,
                                "reason": "its last record is cut where the data ends"}]  # fmt: skip
    with log.open("ab") as out:
        out.write(event[40:].encode() + b"\n")
    second = ingest_paths([log], url=db_url)
    assert (second.raw_inserted, second.raw_duplicates, second.held_back) == (1, 1, [])
    assert placed(db_url) == expected(log)


def test_a_pretty_printed_record_cut_after_one_of_its_lines_is_held_back_too(db_url: str, tmp_path: Path) -> None:
    """The file ends with a newline, but the record is still open there: a writer mid-record, not a finished line."""
    pretty = json.dumps(CONNECT, indent=2)
    log = write_log(tmp_path / "cowrie.json", dumps(CONNECT))
    with log.open("a") as out:
        out.write("\n".join(pretty.splitlines()[:4]) + "\n")
    first = ingest_paths([log], url=db_url)
    assert (first.dlq_inserted, len(first.held_back)) == (0, 1)
    with log.open("a") as out:
        out.write("\n".join(pretty.splitlines()[4:]) + "\n")
    second = ingest_paths([log], url=db_url)
    assert (second.raw_inserted, second.dlq_inserted, second.held_back) == (1, 0, [])
    assert placed(db_url) == expected(log)


def test_a_plain_file_is_read_up_to_its_size_when_opened(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a writer appends while the file is read is the next ingest's: the end this ingest judges (whole, or
    cut and held back) is the one it opened, never a momentary end it reads past."""
    event = dumps(CONNECT)
    log = write_log(tmp_path / "cowrie.json", event)
    with log.open("a") as out:
        out.write(event[:50])
    reader = ingest.read_records

    def appended_once_opened(stream: Any, **options: Any) -> Any:
        with log.open("a") as out:
            out.write(event[50:] + "\n" + event + "\n")
        return reader(stream, **options)

    monkeypatch.setattr(ingest, "read_records", appended_once_opened)
    first = ingest_paths([log], url=db_url)
    assert (first.records, first.raw_inserted, [h["offset"] for h in first.held_back]) == (1, 1, [len(event) + 1])
    monkeypatch.undo()
    second = ingest_paths([log], url=db_url)
    assert (second.raw_inserted, second.raw_duplicates, second.dlq_inserted) == (2, 1, 0)
    assert placed(db_url) == expected(log)


def test_the_insert_path_writes_any_character_under_a_latin1_client_encoding(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-read goes the insert way; its parameters are sent as UTF-8 whatever PGCLIENTENCODING says."""
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    (tmp_path / "日本").mkdir()
    log = write_log(tmp_path / "日本" / "cowrie.json", dumps(CONNECT))
    ingest_paths([log], url=db_url)
    with log.open("a") as out:
        out.write(dumps({**CONNECT, "message": "✓ 日本"}) + "\n")
    report = ingest_paths([log], url=db_url)
    assert (report.raw_inserted, report.raw_duplicates) == (1, 1)
    with psycopg.connect(db_url) as conn:
        conn.execute("SET client_encoding = 'UTF8'")
        messages = [m for (m,) in conn.execute("SELECT payload ->> 'message' FROM raw_events ORDER BY source_offset")]
    assert messages[-1] == "✓ 日本"


def keys(url: str) -> list[tuple[str, int]]:
    """(source_inode, offset) of every row of both tables, sorted."""
    return placed(url, "source_inode")


def test_a_log_truncated_in_place_and_rewritten_keeps_its_new_records(db_url: str, tmp_path: Path) -> None:
    """logrotate's copytruncate: the file keeps its inode and its new content reuses the old offsets. Its records
    are keyed as the file's second generation, each stored once; read again, they are duplicates."""
    events = [dumps({**CONNECT, "src_port": port}) for port in range(100, 103)]  # same length each
    log = write_log(tmp_path / "cowrie.json", *events)
    ingest_paths([log], url=db_url)
    inode, size = str(log.stat().st_ino), len(events[0]) + 1
    junk = "not json at all, attacker junk\n"
    with log.open("r+b") as out:  # in place: same inode
        out.truncate(0)
        out.write((junk + dumps(CONNECT) + "\n").encode())
    left_alone(log)
    report = ingest_paths([log], url=db_url)
    assert (report.raw_inserted, report.dlq_inserted, report.raw_duplicates) == (1, 1, 0)
    assert [(r["inode"], r["generation"]) for r in report.rewritten_files] == [(inode, 2)]
    assert keys(db_url) == [(inode, 0), (inode, size), (inode, 2 * size), (f"{inode}.2", 0), (f"{inode}.2", len(junk))]
    again = ingest_paths([log], url=db_url)
    assert (again.raw_inserted, again.dlq_inserted, again.raw_duplicates, again.dlq_duplicates) == (0, 0, 1, 1)
    assert again.rewritten_files == []


def test_a_log_emptied_then_written_again_is_one_new_generation(db_url: str, tmp_path: Path) -> None:
    """Read while empty after its truncation, then again once written: the new content is one generation, read
    across both ingests, and the second ingest sees a file that grew."""
    first = [dumps({**CONNECT, "src_port": port}) for port in range(3)]
    log = write_log(tmp_path / "cowrie.json", *first)
    ingest_paths([log], url=db_url)
    inode = str(log.stat().st_ino)
    os.truncate(log, 0)
    emptied = ingest_paths([log], url=db_url)
    assert emptied.records == 0 and [r["generation"] for r in emptied.rewritten_files] == [2]
    with log.open("ab") as out:
        out.write(("\n".join(dumps({**CONNECT, "src_port": port}) for port in range(10, 15)) + "\n").encode())
    grown = ingest_paths([log], url=db_url)
    assert (grown.raw_inserted, grown.raw_duplicates, grown.rewritten_files) == (5, 0, [])
    assert {key for key, _ in keys(db_url)} == {inode, f"{inode}.2"}


def test_a_log_cut_back_to_an_earlier_size_loses_none_of_what_is_appended_after(db_url: str, tmp_path: Path) -> None:
    """Truncated to a shorter prefix (its first bytes unchanged) and appended to: the offsets past the cut were used
    by other records before, so the file is a new generation; the records it keeps are stored again under it."""
    events = [dumps({**CONNECT, "src_port": port}) for port in range(100, 140)]  # same length each
    log = write_log(tmp_path / "cowrie.json", *events)
    ingest_paths([log], url=db_url)
    os.truncate(log, 20 * (len(events[0]) + 1))  # after the 20th record
    with log.open("ab") as out:
        out.write((dumps({**CONNECT, "src_port": 9999}) + "\n").encode())
    report = ingest_paths([log], url=db_url)
    assert report.raw_inserted == 21 and report.rewritten_files[0]["why"] == ["smaller"]
    with psycopg.connect(db_url) as conn:
        ports = conn.execute("SELECT payload -> 'src_port' FROM raw_events WHERE source_inode LIKE '%.2'").fetchall()
    assert sorted(p for (p,) in ports) == [*range(100, 120), 9999]


def test_a_log_cut_back_past_its_first_bytes_and_appended_beyond_its_old_end_keeps_every_new_record(
    db_url: str, tmp_path: Path
) -> None:
    """Its first 4 KiB unchanged and larger than before: only the bytes before the end read last tell it from a file
    that grew (new records there would sit at offsets stored for old ones)."""
    old = [dumps({**CONNECT, "src_port": port, "message": "x" * 60}) for port in range(1000, 1030)]
    log = write_log(tmp_path / "cowrie.json", *old)
    ingest_paths([log], url=db_url)
    os.truncate(log, 20 * (len(old[0]) + 1))
    with log.open("ab") as out:
        out.writelines((dumps({**CONNECT, "src_port": port, "message": "y" * 60}) + "\n").encode()
                       for port in range(2000, 2020))  # fmt: skip
    left_alone(log)
    report = ingest_paths([log], url=db_url)
    assert [r["why"] for r in report.rewritten_files] == [["bytes before the end read last differ"]]
    assert report.raw_inserted == 40  # the 20 records kept, again under the new key, and the 20 new ones
    with psycopg.connect(db_url) as conn:
        ports = conn.execute("SELECT (payload -> 'src_port')::int FROM raw_events WHERE source_inode LIKE '%.2'")
        assert sorted(p for (p,) in ports) == [*range(1000, 1020), *range(2000, 2020)]
    assert ingest_paths([log], url=db_url).rewritten_files == []


def test_a_file_that_grew_keeps_its_key_and_its_first_bytes_are_kept_for_the_next_read(
    db_url: str, tmp_path: Path
) -> None:
    """A file first read shorter than the bytes kept of it (a fresh log) is known by those; once longer, by more."""
    log = tmp_path / "cowrie.json"
    log.write_text(dumps(CONNECT) + "\n")
    ingest_paths([log], url=db_url)
    with log.open("a") as out:
        out.writelines(dumps({**CONNECT, "src_port": port}) + "\n" for port in range(100))
    grown = ingest_paths([log], url=db_url)
    assert (grown.raw_inserted, grown.raw_duplicates, grown.rewritten_files) == (100, 1, [])
    with psycopg.connect(db_url) as conn:
        head, size, generation = conn.execute("SELECT head, size, generation FROM dlq_source_files").fetchone()
    assert (bytes(head), size, generation) == (log.read_bytes()[: ingest.HEAD_BYTES], log.stat().st_size, 1)
    assert {key for key, _ in keys(db_url)} == {str(log.stat().st_ino)}


def test_a_compressed_log_rewritten_in_place_is_a_new_generation(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "cowrie.json.1.gz"
    log.write_bytes(gzip.compress((dumps(CONNECT) + "\n").encode(), mtime=1))
    ingest_paths([log], url=db_url)
    with log.open("r+b") as out:
        out.truncate(0)
        out.write(gzip.compress((dumps({**CONNECT, "src_port": 7}) + "\n").encode(), mtime=2))
    report = ingest_paths([log], url=db_url)
    assert report.raw_inserted == 1 and [r["generation"] for r in report.rewritten_files] == [2]


def test_the_cut_end_of_a_file_left_alone_is_a_dead_letter(db_url: str, tmp_path: Path) -> None:
    """A file unchanged for BEING_WRITTEN_SECONDS is finished: its cut last record is stored like any other."""
    event = dumps(CONNECT)
    log = write_log(tmp_path / "cowrie.json", event)
    with log.open("ab") as out:
        out.write(event[:40].encode())
    settled = time.time() - ingest.BEING_WRITTEN_SECONDS - 1
    os.utime(log, (settled, settled))
    report = ingest_paths([log], url=db_url)
    assert (report.raw_inserted, report.dlq_inserted, report.held_back, dict(report.dlq_reasons)) == (
        1, 1, [], {"truncated": 1},
    )  # fmt: skip
    assert placed(db_url) == expected(log)


def test_a_finished_cut_end_completed_later_ends_in_one_place(db_url: str, tmp_path: Path) -> None:
    """A file left alone with its last record cut (stored as a truncated dead letter) whose writer completes it
    later: the whole record goes to raw_events, and the dead letter of the cut read is resolved, superseded."""
    whole = [dumps({**CONNECT, "src_port": port}) for port in range(3)]
    log = tmp_path / "cowrie.json"
    log.write_text("\n".join(whole)[:-100])
    left_alone(log)
    first = ingest_paths([log], url=db_url)
    assert (first.raw_inserted, dict(first.dlq_reasons)) == (2, {"truncated": 1})
    with log.open("a") as out:
        out.write("\n".join(whole)[-100:] + "\n")
    left_alone(log)
    second = ingest_paths([log], url=db_url)
    assert (second.raw_inserted, second.dlq_superseded, second.rewritten_files) == (1, 1, [])
    with psycopg.connect(db_url) as conn:
        letter = conn.execute("SELECT source_offset, resolved, resolution_method FROM dead_letter_events").fetchall()
        pending = conn.execute("SELECT pending_events FROM dlq_health").fetchone()
    cut_at = 2 * (len(whole[0]) + 1)
    assert letter == [(cut_at, True, "superseded")] and pending == (0,)
    assert ingest_paths([log], url=db_url).dlq_superseded == 0


def test_a_cut_end_closed_by_repair_is_replaced_by_the_whole_record_completed_later(
    db_url: str, tmp_path: Path
) -> None:
    """A file left alone with its last record cut: the dead letter is repaired into a partial event (the record
    closed where it was cut). Its writer completes the record later: the next ingest stores the whole record in
    place of the partial one, not skip it as a duplicate."""
    whole = {"eventid": "cowrie.session.connect", "sensor": "honeypot-1", "timestamp": "2024-01-15T10:30:00.123456Z",
             "src_ip": "203.0.113.9", "session": "3f2a9c0b1d4e", "src_port": 50122, "dst_ip": "198.51.100.2",
             "dst_port": 22, "protocol": "ssh", "message": "New connection"}  # fmt: skip
    first, last = dumps({**CONNECT, "src_port": 1}), dumps(whole)
    cut = last.index(', "src_port"')
    log = tmp_path / "cowrie.json"
    log.write_text(f"{first}\n{last[:cut]}")
    left_alone(log)
    assert ingest_paths([log], url=db_url).dlq_reasons == {"truncated": 1}
    Worker(db_url, WorkerConfig(batch_size=10, min_batch_size=10, max_batch_size=10)).run()
    at = len(first) + 1
    with psycopg.connect(db_url) as conn:
        query = "SELECT partial, payload, repair_strategy FROM raw_events WHERE source_offset = %s"
        partial, payload, strategy = conn.execute(query, (at,)).fetchone()
        assert partial and strategy == "truncation_closed" and "src_port" not in payload
        with log.open("a") as out:
            out.write(last[cut:] + "\n" + dumps({**CONNECT, "src_port": 3}) + "\n")
        left_alone(log)
        second = ingest_paths([log], url=db_url)
        assert (second.raw_inserted, second.raw_duplicates, dict(second.dlq_reasons)) == (2, 1, {})
        assert conn.execute(query, (at,)).fetchone() == (False, whole, None)
        assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == (3,)
    assert ingest_paths([log], url=db_url).raw_inserted == 0  # whole now: nothing to replace


class _Statements(psycopg.Connection[Any]):
    """A connection that keeps the text of every statement it executes."""

    executed: list[str]

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        self.__dict__.setdefault("executed", []).append(str(query))
        return super().execute(query, *args, **kwargs)


@pytest.mark.parametrize("path", ["copy", "insert"])
def test_a_first_read_finds_no_earlier_dead_letter_to_supersede_and_updates_nothing(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Superseding looks for the dead letters an earlier read left among a batch's events. A batch's own dead
    letters are stored after that probe: a first read with dead letters in every batch runs no UPDATE (each would
    cost what the planner makes of young statistics, on a large file a scan of every pending dead letter)."""
    lines = [dumps({**CONNECT, "src_port": i}) if i % 3 else f"junk {i}" for i in range(60)]
    log = write_log(tmp_path / "log.json", *lines)
    connections: list[_Statements] = []

    def connect(url: str) -> psycopg.Connection[Any]:
        conn = _Statements.connect(url, autocommit=True)
        connections.append(conn)
        return conn

    monkeypatch.setattr(ingest, "_connect", connect)
    if path == "insert":
        force_insert_path(monkeypatch)
    report = ingest_paths([log], url=db_url, batch_size=10)
    executed = [q for conn in connections for q in conn.executed]
    assert report.dlq_inserted == 20 and report.dlq_superseded == 0
    assert sum("SELECT EXISTS (SELECT FROM dead_letter_events" in q for q in executed) == 6  # a probe a batch
    assert not [q for q in executed if "UPDATE dead_letter_events" in q]


def test_a_gzip_file_being_compressed_is_read_up_to_its_cut_and_the_rest_later(db_url: str, tmp_path: Path) -> None:
    """A rotated log read while it is being compressed: its records so far, the cut held back; once whole, the
    rest, each record in one place and no dead letter for the cut."""
    events = [dumps({**CONNECT, "src_port": port}) for port in range(2000)]
    whole = gzip.compress(("\n".join(events) + "\n").encode())
    log = tmp_path / "cowrie.json.1.gz"
    log.write_bytes(whole[: len(whole) // 2])
    first = ingest_paths([log], url=db_url)
    assert first.dlq_inserted == 0 and first.damaged_files == [] and len(first.held_back) == 1
    log.write_bytes(whole)
    second = ingest_paths([log], url=db_url)
    assert second.held_back == [] and second.dlq_inserted == 0
    assert first.raw_inserted + second.raw_inserted == len(events)
    assert placed(db_url) == expected(log)


# --- two ingests of one file at once ---------------------------------------------------------------------------


def assert_each_record_once(url: str, log: Path, reports: list[IngestReport]) -> None:
    records = len(records_of(log))
    assert placed(url) == expected(log)
    assert all(r.records == records for r in reports)
    assert sum(r.raw_inserted + r.dlq_inserted for r in reports) == records
    assert sum(r.raw_duplicates + r.dlq_duplicates for r in reports) == records * (len(reports) - 1)


def test_two_ingests_of_one_file_at_once_in_threads_store_each_record_once(db_url: str, tmp_path: Path) -> None:
    """Both read the file as unseen and copy: the second COPY of a batch waits on the first's positions, fails on
    them once they commit, and falls back to the insert path, which skips them."""
    log = tricky_log(tmp_path / "cowrie.json", 8, n_events=3000)
    reports, errors = at_once(2, lambda: ingest_paths([log], url=db_url, batch_size=25))
    assert errors == []
    assert_each_record_once(db_url, log, reports)


def test_one_file_named_twice_with_two_workers_is_stored_once(db_url: str, tmp_path: Path) -> None:
    """Two processes reading the same file at the same time: the merged report counts it twice, stores it once."""
    log = tricky_log(tmp_path / "cowrie.json", 9, n_events=3000)
    report = ingest_paths([log, log], url=db_url, batch_size=25, workers=2)
    records = len(records_of(log))
    assert (report.files, report.records) == (2, 2 * records)
    assert report.raw_inserted + report.dlq_inserted == records
    assert report.raw_duplicates + report.dlq_duplicates == records
    assert placed(db_url) == expected(log)


def test_a_copy_meeting_stored_positions_is_undone_and_the_insert_path_adds_only_the_missing(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copies: list[Any]
) -> None:
    """``_unseen`` told wrong (as when another ingest commits between it and the COPY): the COPY fails on a
    stored position, its savepoint is rolled back, and the insert path writes exactly the rows that are missing."""
    log = tricky_log(tmp_path / "cowrie.json", 12)
    first = ingest_paths([log], url=db_url, batch_size=20)
    before = stored(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        deleted = conn.execute("DELETE FROM raw_events WHERE id % 3 = 0").rowcount
    assert 0 < deleted < first.raw_inserted

    monkeypatch.setattr(ingest, "_unseen", lambda *args: True)
    copies.clear()
    again = ingest_paths([log], url=db_url, batch_size=20)

    assert ("raw_events", "unique_violation") in copies
    assert (again.raw_inserted, again.dlq_inserted) == (deleted, 0)
    assert (again.raw_duplicates, again.dlq_duplicates) == (first.raw_inserted - deleted, first.dlq_inserted)
    assert again.records == first.records
    assert stored(db_url) == before  # the deleted rows back as they were, nothing doubled
    assert placed(db_url) == expected(log)


# --- several files in processes --------------------------------------------------------------------------------


def log_directory(root: Path) -> list[Path]:
    """Plain and compressed logs of different sizes, and a gzip file cut short."""
    root.mkdir()
    plain = root / "plain"
    plain.mkdir()
    for seed, (name, events) in enumerate(
        [("cowrie.json", 500), ("cowrie.json.1", 900), ("cowrie.json.2", 40), ("cowrie.json.3", 300),
         ("cowrie.json.4", 600)], start=41,
    ):  # fmt: skip
        write_corrupted_log(plain / name, n_events=events, seed=seed)
    logs = root / "logs"
    logs.mkdir()
    (logs / "cowrie.json").write_bytes((plain / "cowrie.json").read_bytes())
    (logs / "cowrie.json.1.gz").write_bytes(gzip.compress((plain / "cowrie.json.1").read_bytes()))
    (logs / "cowrie.json.2").write_bytes((plain / "cowrie.json.2").read_bytes())
    (logs / "cowrie.json.3.bz2").write_bytes(bz2.compress((plain / "cowrie.json.3").read_bytes()))
    whole = gzip.compress((plain / "cowrie.json.4").read_bytes())
    (logs / "cowrie.json.4.gz").write_bytes(whole[: len(whole) * 2 // 3])
    left_alone(logs / "cowrie.json.4.gz")
    return sorted(logs.iterdir())


def test_files_ingested_in_processes_store_and_report_what_one_process_does(
    db_url: str, other_db_url: str, tmp_path: Path
) -> None:
    """Reports merged from processes, and progress forwarded from them, match a single process's."""
    files = log_directory(tmp_path / "d")
    directory = files[0].parent
    progress: dict[int, list[int]] = {1: [], 3: []}
    alone = ingest_paths([directory], url=db_url, batch_size=50, on_batch=progress[1].append)
    together = ingest_paths([directory], url=other_db_url, batch_size=50, workers=3, on_batch=progress[3].append)

    assert numbers(alone) == numbers(together)
    assert alone.files == len(files) and alone.compressed_files == {"gzip": 2, "bzip2": 1}
    (damaged,) = together.damaged_files
    assert damaged["path"] == str(directory / "cowrie.json.4.gz") and damaged["reason"] == "compressed_truncated"
    assert stored(db_url) == stored(other_db_url)
    tail = (str(directory / "cowrie.json.4.gz"), damaged["decompressed_offset"])
    assert placed(other_db_url) == sorted([*expected(*files), tail])
    assert together.records + 1 == together.raw_inserted + together.dlq_inserted
    size = sum(p.stat().st_size for p in files)
    assert sum(progress[1]) == sum(progress[3]) == size
    assert len(progress[3]) > len(files)  # batch by batch, not one call per file


def test_an_error_in_one_file_is_raised_after_the_other_files_are_ingested_whole(db_url: str, tmp_path: Path) -> None:
    """A file name that is not UTF-8 cannot be stored as a source: ingest_file refuses it, and the processes
    reading the other files, started before or after it, still finish them."""
    good = [tricky_log(tmp_path / f"{name}.json", seed) for seed, name in enumerate("abc", start=60)]
    bad = tmp_path / "b\udcff.json"
    bad.write_bytes(good[0].read_bytes() * 3)  # the largest: started first
    with pytest.raises(ValueError, match="not valid UTF-8"):
        ingest_paths([good[0], bad, good[1], good[2]], url=db_url, batch_size=40, workers=2)
    assert placed(db_url) == expected(*good)


REFUSE = """
    CREATE FUNCTION test_refuse_offset() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'test refuses offset % of %', NEW.source_offset, NEW.source;
    END $$;
    CREATE TRIGGER test_refuse BEFORE INSERT ON {table} FOR EACH ROW
        WHEN (NEW.source_offset = {offset} AND NEW.source LIKE '%/refused.json') EXECUTE FUNCTION test_refuse_offset();
"""


@pytest.mark.parametrize("path", ["copy", "insert"])
@pytest.mark.parametrize("table", TABLES)
def test_a_database_error_in_the_writer_is_raised_and_leaves_earlier_batches_committed_and_its_batch_out(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, path: str
) -> None:
    """A batch is one transaction: the error of either table's statement undoes the other's rows of the batch,
    and the batches written before stay. The error reaches the caller from the writer thread."""
    lines = [dumps({**CONNECT, "src_port": i}) if i % 2 == 0 else f"junk {i}" for i in range(100)]
    log = write_log(tmp_path / "refused.json", *lines)
    offsets = records_of(log)
    refused = offsets[44] if table == "raw_events" else offsets[45]  # in the fifth batch of 10
    conn.execute(REFUSE.format(table=table, offset=refused))
    if path == "insert":
        force_insert_path(monkeypatch)
    with pytest.raises(psycopg.errors.RaiseException, match=f"test refuses offset {refused} "):
        ingest_paths([log], url=db_url, batch_size=10)
    assert placed(db_url) == [(str(log.resolve()), offset) for offset in offsets[:40]]


@pytest.mark.parametrize("path", ["copy", "insert"])
@pytest.mark.parametrize(("records", "batches"), [(45, 5), (7, 1)])
def test_only_the_last_batch_of_a_file_waits_for_its_wal_flush(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, records: int, batches: int
) -> None:
    """Every batch but a file's last commits without waiting for its WAL to reach disk; the last one's commit waits,
    and, the WAL being one sequence, for theirs too: a file reported ingested is on disk whole."""
    lines = [dumps({**CONNECT, "src_port": i}) if i % 2 == 0 else f"junk {i}" for i in range(records)]
    log = write_log(tmp_path / "log.json", *lines)
    in_force: list[str] = []
    supersede = ingest._supersede

    def spy(conn: psycopg.Connection[Any], source: str, inode: str, batch: ingest._Batch) -> int:
        in_force.append(conn.execute("SHOW synchronous_commit").fetchone()[0])  # inside the batch's transaction
        return supersede(conn, source, inode, batch)

    monkeypatch.setattr(ingest, "_supersede", spy)
    if path == "insert":
        force_insert_path(monkeypatch)
    report = ingest_paths([log], url=db_url, batch_size=10)
    assert in_force == ["off"] * (batches - 1) + ["on"]
    assert report.raw_inserted + report.dlq_inserted == records


def test_a_database_error_in_a_worker_process_is_raised_and_the_other_file_is_ingested(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    """The server's error crosses the process boundary (pickled) and is raised once the other file is done."""
    lines = [dumps({**CONNECT, "src_port": i}) if i % 2 == 0 else f"junk {i}" for i in range(100)]
    log = write_log(tmp_path / "refused.json", *lines)
    other = tricky_log(tmp_path / "other.json", 70)
    offsets = records_of(log)
    conn.execute(REFUSE.format(table="raw_events", offset=offsets[44]))
    with pytest.raises(psycopg.errors.RaiseException, match=f"test refuses offset {offsets[44]} "):
        ingest_paths([log, other], url=db_url, batch_size=10, workers=2)
    assert placed(db_url) == sorted(expected(other) + [(str(log.resolve()), offset) for offset in offsets[:40]])


# --- the command -----------------------------------------------------------------------------------------------


def test_cli_ingest_with_two_workers_reports_the_counts_it_stored(db_url: str, tmp_path: Path) -> None:
    """What the command prints is what the processes stored, plain and gzip files alike."""
    first = tricky_log(tmp_path / "cowrie.json", 80)
    second = tmp_path / "cowrie.json.1.gz"
    second.write_bytes(gzip.compress(tricky_log(tmp_path / "plain.json", 81, n_events=300).read_bytes()))
    code, out = run("--database-url", db_url, "ingest", str(first), str(second), "--workers", "2",
                    "--batch-size", "50", "--json")  # fmt: skip
    assert code == 0, out
    report = json.loads(out)
    with psycopg.connect(db_url) as conn:
        raw, dead = (conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES)
        reasons = dict(conn.execute("SELECT reason, count(*) FROM dead_letter_events GROUP BY reason").fetchall())
    assert (report["files"], report["compressed_files"]) == (2, {"gzip": 1})
    assert report["records"] == len(records_of(first)) + len(records_of(second)) == raw + dead
    assert (report["raw_inserted"], report["dlq_inserted"], report["dlq_reasons"]) == (raw, dead, reasons)
    assert placed(db_url) == expected(first, second)


def children_of(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"\nPPid:\t{pid}\n" in status.read_text():
                found.add(int(status.parent.name))
        except OSError:  # gone meanwhile
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="finds the workers in /proc")
def test_workers_end_when_their_parent_is_killed(db_url: str, tmp_path: Path) -> None:
    """Killed alone, the parent leaves no worker ingesting on, then idling under init forever."""
    files = [tmp_path / f"cowrie.json.{n}" for n in (1, 2)]
    for seed, path in enumerate(files):
        write_corrupted_log(path, n_events=40_000, seed=seed, truth_path=None)
    command = [sys.executable, "-m", "dlq_assets.cli", "--database-url", db_url, "ingest", "--workers", "2"]
    command += map(str, files)
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(workers := children_of(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2, "the workers never started"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while (alive := {pid for pid in workers if Path(f"/proc/{pid}").exists()}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive


def test_an_event_whose_timestamp_postgresql_refuses_is_a_dead_letter_not_a_failed_file(
    db_url: str, tmp_path: Path
) -> None:
    """An offset with 90 minutes parses in Python but not as timestamptz: sent to raw_events it failed the batch's
    write, and the file with it, at every ingest. Validation refuses it, so it waits in the DLQ like any other."""
    log = write_log(
        tmp_path / "cowrie.json", dumps(CONNECT), dumps({**CONNECT, "timestamp": "2018-05-01T12:34:56+05:90"})
    )
    report = ingest_paths([log], url=db_url)
    assert (report.raw_inserted, report.dlq_inserted, dict(report.dlq_reasons)) == (1, 1, {"validation_failed": 1})
    assert placed(db_url) == expected(log)
