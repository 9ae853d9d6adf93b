"""Ingest on a real server: every record ends in exactly one known place, losslessly, and only once."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dlq_assets.core import jsonutil
from dlq_assets.core.intake.ingest import expand_paths, ingest_paths
from dlq_assets.core.intake.reader import read_file
from dlq_assets.devtools.generator import write_corrupted_log

CONNECT = {
    "eventid": "cowrie.session.connect",
    "timestamp": "2024-01-15T10:30:00.123456Z",
    "session": "3f2a9c0b1d4e",
    "src_ip": "2001:db8::1",
    "src_port": 50122,
    "dst_ip": "2001:db8::2",
    "dst_port": 22,
    "protocol": "ssh",
    "sensor": "hp1",
    "message": "New connection",
}


# Kinds that write each event as exactly one record, valid only when clean or pretty: what the lossless test
# below counts on (other kinds put several events on a line or cut one into the next).
ONE_RECORD_KINDS = ("pretty", "truncated", "trailing_comma", "bad_escape", "split_line", "binary_junk",
                    "missing_field", "invalid_value")  # fmt: skip


def dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False)


def write_log(path: Path, *records: str | bytes) -> Path:
    path.write_bytes(b"".join((r.encode() if isinstance(r, str) else r) + b"\n" for r in records))
    return path


def rows(conn: psycopg.Connection, table: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT * FROM {table} ORDER BY source, source_offset")
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def unwrap(payload: Any) -> bytes | Any:
    """The record's bytes back from a wrapped payload, or the JSON value itself."""
    if isinstance(payload, dict) and set(payload) == {"raw_text"}:
        return payload["raw_text"].encode()
    if isinstance(payload, dict) and set(payload) == {"raw_base64"}:
        return base64.b64decode(payload["raw_base64"])
    return payload


def test_generated_log_every_record_ends_in_exactly_one_place_losslessly(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    log = tmp_path / "cowrie.json"
    truth = write_corrupted_log(log, n_events=1500, seed=7, corruption_rate=0.35, kinds=ONE_RECORD_KINDS)
    data = log.read_bytes()
    records = list(read_file(log))
    report = ingest_paths([log], url=db_url, batch_size=200)

    raw = rows(conn, "raw_events")
    dead = rows(conn, "dead_letter_events")
    assert report.records == len(records) == len(raw) + len(dead)
    assert (report.raw_inserted, report.dlq_inserted) == (len(raw), len(dead))
    placed = sorted([r["source_offset"] for r in raw] + [d["source_offset"] for d in dead])
    assert placed == [r.offset for r in records]  # each record once, none twice, none missing

    by_offset = {t.offset: t for t in truth}
    for row in raw:  # valid events are exactly what Cowrie wrote
        original = by_offset[row["source_offset"]]
        assert original.corruption in ("clean", "pretty")
        assert row["payload_checksum"] == jsonutil.payload_checksum(original.original)
        assert row["eventid"] == original.original["eventid"]
    clean = sum(1 for t in truth if t.corruption in ("clean", "pretty"))
    assert len(raw) == clean

    inode = str(log.stat().st_ino)
    for row in dead:
        assert row["source"] == str(log.resolve()) and row["source_inode"] == inode
        assert row["payload_checksum"] == jsonutil.payload_checksum(row["payload"])
        assert row["idempotency_key"] and row["reason"] and row["classification"]
        assert 1 <= row["priority"] <= 10
        exact = data[row["source_offset"] : row["source_offset"] + row["metadata_json"]["record_bytes"]]
        kept = unwrap(row["payload"])
        if isinstance(kept, bytes):
            assert kept == exact
        else:
            assert kept == json.loads(exact)

    again = ingest_paths([log], url=db_url)
    assert (again.raw_inserted, again.dlq_inserted) == (0, 0)
    assert (again.raw_duplicates, again.dlq_duplicates) == (len(raw), len(dead))
    assert len(rows(conn, "raw_events")) == len(raw) and len(rows(conn, "dead_letter_events")) == len(dead)


def test_pretty_printed_and_real_cowrie_events_are_valid(db_url: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    params = {"eventid": "cowrie.session.params", "arch": "linux-x64-lsb", "timestamp": "2024-01-15T10:30:00Z",
              "session": "3f2a9c0b1d4e", "src_ip": "203.0.113.10"}  # fmt: skip
    log = write_log(tmp_path / "a.json", json.dumps(CONNECT, indent=2), dumps(params), "")
    report = ingest_paths([log], url=db_url)
    assert (report.raw_inserted, report.dlq_inserted) == (2, 0)
    first = rows(conn, "raw_events")[0]
    assert first["source_offset"] == 0 and str(first["src_ip"]) == "2001:db8::1"
    assert first["payload"] == json.loads(json.dumps(CONNECT))


@pytest.mark.parametrize(
    ("record", "reason", "form", "classification", "priority"),
    [
        (b'{"eventid": "cowrie.login.success", "session": "5d77535d8ac4", "username": "ro', "truncated",
         "raw_text", "malformed", 2),
        (b"this is not JSON at all {{{[[[]]]}}}", "json_parse_error", "raw_text", "malformed", 7),
        (b'{"eventid": "cowrie.login.failed", "x": "\xff\xfe"}', "invalid_utf8", "raw_base64", "binary", 9),
        (b'{"eventid": "cowrie.login.failed", "x": "a\x00b"}', "nul_byte", "raw_base64", "binary", 9),
        (b'{"eventid": "cowrie.unknown.event", "timestamp": "2024-01-15T10:30:00Z"}', "validation_failed",
         "json", "invalid", 5),
        (b'{"eventid": "cowrie.session.closed", "timestamp": "2024-01-15T10:30:00Z", "session": "x\' OR 1=1 --"}',
         "validation_failed", "json", "malicious", 3),
        (b'"hmac-sha1"', "validation_failed", "json", "invalid", 7),
        (b'{"session": "dlq1", "eventid": "cowrie.command.input", "input": "wget http://bad"}',
         "validation_failed", "json", "invalid", 2),
        (b"[" * 600 + b"]" * 600, "too_deeply_nested", "raw_text", "oversize", 9),
    ],
)  # fmt: skip
def test_each_kind_of_bad_record_is_kept_losslessly_with_reason_and_rules(
    db_url: str,
    conn: psycopg.Connection,
    tmp_path: Path,
    record: bytes,
    reason: str,
    form: str,
    classification: str,
    priority: int,
) -> None:
    log = write_log(tmp_path / "bad.json", dumps(CONNECT), record)
    report = ingest_paths([log], url=db_url)
    assert (report.raw_inserted, report.dlq_inserted) == (1, 1)
    (row,) = rows(conn, "dead_letter_events")
    assert row["source_offset"] == len(dumps(CONNECT).encode()) + 1
    assert (row["reason"], row["metadata_json"]["payload_form"]) == (reason, form)
    assert (row["classification"], row["priority"]) == (classification, priority)
    kept = unwrap(row["payload"])
    assert (kept if isinstance(kept, bytes) else json.dumps(kept).encode()) == record or kept == json.loads(record)


def test_a_valid_event_with_a_nul_escape_is_stored_without_the_nul_and_its_text_kept(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    text = dumps({**CONNECT, "message": "hello\x00world"})
    assert "\\u0000" in text
    report = ingest_paths([write_log(tmp_path / "nul.json", text)], url=db_url)
    assert (report.raw_inserted, report.dlq_inserted, report.sanitized) == (1, 0, 1)
    (row,) = rows(conn, "raw_events")
    assert row["payload"]["message"] == "helloworld"
    assert row["original_text"] == text  # lossless: the record as written


def test_empty_and_blank_files_produce_nothing(db_url: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_bytes(b"")
    (tmp_path / "blank.json").write_bytes(b"  \n\r\n\t\n")
    report = ingest_paths([tmp_path], url=db_url)
    assert (report.files, report.records) == (2, 0)
    assert rows(conn, "dead_letter_events") == [] and rows(conn, "raw_events") == []


def test_missing_schema_and_missing_file_are_clear_errors(empty_db_url: str, db_url: str, tmp_path: Path) -> None:
    log = write_log(tmp_path / "a.json", dumps(CONNECT))
    with pytest.raises(RuntimeError, match="run `dlq create` first"):
        ingest_paths([log], url=empty_db_url)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        ingest_paths([tmp_path / "nope.json"], url=db_url)


def test_a_copy_of_a_file_elsewhere_is_a_different_source(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    first = write_log(tmp_path / "a.json", dumps(CONNECT), "garbage")
    second = write_log(tmp_path / "b.json", dumps(CONNECT), "garbage")
    ingest_paths([first, second], url=db_url)
    assert len(rows(conn, "raw_events")) == 2 and len(rows(conn, "dead_letter_events")) == 2


def test_a_directory_takes_cowrie_names_and_rotated_forms_and_lists_what_it_skips(tmp_path: Path) -> None:
    taken = ["cowrie.json", "cowrie.json.2026-03-01", "cowrie.json.2026-03-01.gz", "cowrie.json.7",
             "cowrie.json.7.bz2", "events.jsonl.zst", "old/cowrie.json.2026-02-28.xz", "other.json"]  # fmt: skip
    left = {"cowrie.log": "name is not a Cowrie JSON log's", "cowrie.json.2026-03-01.gz.tmp":
            "name is not a Cowrie JSON log's", "cowrie.json.bak": "name is not a Cowrie JSON log's",
            "cowrie.json.2026-3-1": "name is not a Cowrie JSON log's", "notes.txt": "name is not a Cowrie JSON "
            "log's"}  # fmt: skip
    (tmp_path / "old").mkdir()
    for name in [*taken, *left]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "gone.json").symlink_to(tmp_path / "nowhere")
    (tmp_path / "linked").symlink_to(tmp_path / "old")
    (tmp_path / "passwd.json").symlink_to("/etc/passwd")
    (tmp_path / "b\udcff.json").write_bytes(b"")  # a name in another encoding: no text column holds it
    files, skipped = expand_paths([tmp_path])
    assert files == sorted(tmp_path / name for name in taken)  # sorted by path: the same order every time
    assert sorted((s["path"], s["reason"]) for s in skipped) == sorted(
        [(str(tmp_path / name), why) for name, why in left.items()]
        + [(str(tmp_path / "gone.json"), "a broken symbolic link"),
           (str(tmp_path / "linked"), "a symbolic link to a directory (not followed)"),
           (str(tmp_path / "passwd.json"),
            "a symbolic link to a file (not followed in a directory: name it to read it)"),
           (str(tmp_path / "b\udcff.json"), "name is not valid UTF-8: no text column holds it")]
    )  # fmt: skip
    named, nothing_skipped = expand_paths([tmp_path / "notes.txt", tmp_path / "cowrie.log"])
    assert (named, nothing_skipped) == ([tmp_path / "notes.txt", tmp_path / "cowrie.log"], [])


def test_a_file_named_explicitly_is_read_whatever_its_name_and_skips_are_reported(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    odd = write_log(tmp_path / "capture.txt", dumps(CONNECT))
    (tmp_path / "logs").mkdir()
    write_log(tmp_path / "logs" / "capture.txt", dumps(CONNECT))
    report = ingest_paths([odd, tmp_path / "logs"], url=db_url)
    assert (report.files, report.raw_inserted) == (1, 1)
    assert report.skipped_files == [{"path": str(tmp_path / "logs" / "capture.txt"),
                                     "reason": "name is not a Cowrie JSON log's"}]  # fmt: skip
    assert json.loads(json.dumps(report.as_dict())) == report.as_dict()


def test_a_byte_order_mark_is_skipped_and_counted(db_url: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    log = write_log(tmp_path / "bom.json", b"\xef\xbb\xbf" + dumps(CONNECT).encode(), dumps(CONNECT))
    report = ingest_paths([log], url=db_url)
    assert (report.boms_skipped, report.raw_inserted, report.dlq_inserted) == (1, 2, 0)
    assert report.compressed_files == {} and report.damaged_files == []
