"""The generator's logs are realistic, deterministic, and their ground truth is exact to the byte."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import re
import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dlq_assets import generator, jsonutil
from dlq_assets.generator import KINDS, TruthRecord, generate_events, write_corrupted_log
from dlq_assets.reader import Record, read_file

CATALOGUE = json.loads((Path(generator.__file__).parent / "data" / "cowrie_eventids.json").read_text("utf-8"))
_VALID_ESCAPE = re.compile(r'\\(["\\/bfnrt]|u[0-9a-fA-F]{4})|\\')


def write(tmp_path: Path, name: str = "log", **options: Any) -> tuple[bytes, list[TruthRecord], list[Record]]:
    path = tmp_path / f"{name}.json"
    truth = write_corrupted_log(path, **options)
    return path.read_bytes(), truth, list(read_file(path))


def overlapping(records: list[Record], truth: TruthRecord) -> list[Record]:
    return [r for r in records if r.offset < truth.offset + truth.length and truth.offset < r.offset + len(r.raw)]


# --- events -------------------------------------------------------------------------------------------------


def test_events_are_deterministic_by_seed() -> None:
    assert generate_events(300, seed=7) == generate_events(300, seed=7)
    assert generate_events(300, seed=7) != generate_events(300, seed=8)
    assert len(generate_events(0)) == 0 and len(generate_events(1234, seed=3)) == 1234


def test_events_validate_with_the_cowrie_validator() -> None:
    from dlq_assets.cowrie import validate_event

    for seed in range(3):
        for event in generate_events(2000, seed=seed):
            result = validate_event(jsonutil.loads(json.dumps(event)))  # as read back from a log
            assert result.valid, (result.errors, event)


def test_events_look_like_cowrie() -> None:
    events = generate_events(3000, seed=11, start=datetime(2023, 5, 1, tzinfo=UTC))
    shared = set(CATALOGUE["shared_attributes_every_event"]) | set(CATALOGUE["connection_attributes"])
    for event in events:
        documented = CATALOGUE["eventids"][event["eventid"]]["attributes"]
        allowed = shared | {name for attr in documented for name in attr["names"]}
        assert set(event) - allowed <= {"duration"}, event  # legacy float seconds on session.closed
        assert {"eventid", "timestamp", "session", "src_ip", "sensor"} <= set(event)
        assert ("message" in event) is (event["eventid"] != "cowrie.session.params")
        assert re.fullmatch(r"[0-9a-f]{12}|[0-9a-f]{8}", event["session"])
        ipaddress.ip_address(event["src_ip"])
        assert jsonutil.loads(json.dumps(event)) == event  # numbers survive the Decimal round trip
    stamps = [e["timestamp"] for e in events]
    assert stamps[0].startswith("2023-05-01T")
    parsed = [datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ") for s in stamps]
    assert all(a < b for a, b in itertools.pairwise(parsed))
    ids = Counter(e["eventid"] for e in events)
    assert set(ids) == {
        "cowrie.session.connect",
        "cowrie.client.version",
        "cowrie.client.kex",
        "cowrie.login.failed",
        "cowrie.login.success",
        "cowrie.command.input",
        "cowrie.session.file_download",
        "cowrie.session.params",
        "cowrie.client.size",
        "cowrie.session.closed",
    }
    sessions = {e["session"]: e for e in events}
    assert 0.05 < sum(":" in e["src_ip"] for e in sessions.values()) / len(sessions) < 0.2
    assert any(len(s) == 8 for s in sessions)
    assert {e["protocol"] for e in events if "protocol" in e} == {"ssh", "telnet"}
    inputs = " ".join(e["input"] for e in events if "input" in e)
    for fragment in ("uname -a", "wget http://", "cat /proc/cpuinfo", '"', "\\", "✓"):
        assert fragment in inputs
    assert any(isinstance(e.get("duration"), float) for e in events)
    for event in events:
        if event["eventid"] == "cowrie.session.file_download":
            assert re.fullmatch(r"[0-9a-f]{64}", event["shasum"]) and event["outfile"].endswith(event["shasum"])
        if event["eventid"] == "cowrie.client.kex":
            assert isinstance(event["kexAlgs"], list) and re.fullmatch(r"[0-9a-f]{32}", event["hassh"])


# --- the corrupted log ----------------------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    data, truth, _ = write(tmp_path, "a", n_events=500, seed=5)
    again, truth_again, _ = write(tmp_path, "b", n_events=500, seed=5)
    other, _, _ = write(tmp_path, "c", n_events=500, seed=6)
    assert data == again and truth == truth_again
    assert data != other


def test_originals_are_generate_events(tmp_path: Path) -> None:
    _, truth, _ = write(tmp_path, n_events=400, seed=9)
    assert [t.original for t in truth] == generate_events(400, seed=9)


def test_truth_offsets_match_the_bytes(tmp_path: Path) -> None:
    data, truth, _ = write(tmp_path, n_events=1500, seed=1, corruption_rate=0.5)
    position = 0
    for record in truth:
        assert record.offset == position
        assert data[record.offset + record.length : record.offset + record.length + 1] == b"\n"
        written = data[record.offset : record.offset + record.length]
        if record.corruption == "clean":
            assert written == json.dumps(record.original, ensure_ascii=False).encode()
        if record.corruption == "pretty":
            assert written == json.dumps(record.original, indent=2, ensure_ascii=False).encode()
        position += record.length + 1
    assert position == len(data)


def test_truth_file_holds_the_same_truth(tmp_path: Path) -> None:
    truth = write_corrupted_log(tmp_path / "log", n_events=300, seed=2, truth_path=tmp_path / "truth.jsonl")
    lines = (tmp_path / "truth.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(text) for text in lines] == [json.loads(json.dumps(asdict(t))) for t in truth]


def test_clean_and_pretty_records_read_back_as_the_original(tmp_path: Path) -> None:
    _, truth, records = write(tmp_path, n_events=2000, seed=4, corruption_rate=0.5)
    by_offset = {r.offset: r for r in records}
    checked = Counter()
    for record in truth:
        if record.corruption in ("clean", "pretty"):
            read = by_offset[record.offset]
            assert (len(read.raw), read.error, read.value) == (record.length, None, record.original)
            checked[record.corruption] += 1
    assert checked["clean"] > 900 and checked["pretty"] > 50


def _rebuild(kind: str, raw: bytes) -> Any:
    """What a minimal repair does with a recoverable record: proof that ``recoverable`` is honest."""
    if kind in ("clean", "pretty"):
        return jsonutil.loads(raw)
    if kind == "truncated":
        return jsonutil.loads(raw + b"}")
    if kind == "split_line":
        return jsonutil.loads(raw.replace(b"\n", b""))
    if kind == "bad_escape":
        text = _VALID_ESCAPE.sub(lambda m: m.group(0) if m.group(1) else "\\\\", raw.decode())
        return jsonutil.loads(text)
    if kind == "trailing_comma":  # exactly one comma is extra
        candidates = []
        for i in (i for i, byte in enumerate(raw) if byte == ord(",")):
            with contextlib.suppress(ValueError):
                candidates.append(jsonutil.loads(raw[:i] + raw[i + 1 :]))
        assert len(candidates) == 1
        return candidates[0]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "pretty"])
def test_each_corruption_kind_breaks_the_record(tmp_path: Path, kind: str) -> None:
    data, truth, records = write(tmp_path, n_events=600, seed=3, corruption_rate=0.4, kinds=[kind])
    damaged = [t for t in truth if t.corruption == kind]
    assert len(damaged) > 12  # bad_escape only fits events holding a literal backslash
    assert {t.corruption for t in truth} == {"clean", kind}
    for record in damaged:
        raw = data[record.offset : record.offset + record.length]
        assert not any(r.ok and r.value == record.original for r in overlapping(records, record))
        if record.recoverable:
            assert _rebuild(kind, raw) == record.original
        if kind == "truncated":
            line = json.dumps(record.original, ensure_ascii=False).encode()
            assert line.startswith(raw) and record.recoverable is (raw == line[:-1])
            assert overlapping(records, record)[0].error in ("truncated", "invalid_utf8")
        elif kind == "split_line":
            assert raw.count(b"\n") == 1
            assert [r.error for r in overlapping(records, record)] == ["truncated", "json_parse_error"]
        elif kind in ("trailing_comma", "bad_escape"):
            assert [r.error for r in overlapping(records, record)] == ["json_parse_error"]
        elif kind == "binary_junk":
            assert b"\xff" in raw and not record.recoverable
            assert {r.error for r in overlapping(records, record)} & {"nul_byte", "invalid_utf8"}
        else:  # missing_field / invalid_value: valid JSON, wrong event
            assert not record.recoverable
            [read] = overlapping(records, record)
            assert read.ok and read.value != record.original
    expected_recoverable = kind in ("trailing_comma", "bad_escape", "split_line")
    if kind != "truncated":
        assert all(t.recoverable is expected_recoverable for t in damaged)
    else:
        assert 0 < sum(t.recoverable for t in damaged) < len(damaged)


def test_kinds_follow_the_corruption_rate(tmp_path: Path) -> None:
    _, truth, _ = write(tmp_path, n_events=2000, seed=21, corruption_rate=0.3)
    counts = Counter(t.corruption for t in truth)
    assert len(truth) == 2000
    assert 0.25 < 1 - counts["clean"] / 2000 < 0.35
    share = 0.3 * 2000 / len(KINDS)
    assert all(0.5 * share < counts[kind] < 1.5 * share for kind in KINDS), counts


def test_rate_zero_is_all_clean_and_unknown_kinds_are_refused(tmp_path: Path) -> None:
    _, truth, records = write(tmp_path, n_events=300, seed=1, corruption_rate=0.0)
    assert {t.corruption for t in truth} == {"clean"} and all(r.ok for r in records)
    with pytest.raises(ValueError):
        write_corrupted_log(tmp_path / "x", n_events=1, kinds=["gremlins"])


def test_ten_thousand_events_are_written_quickly_and_streamed(tmp_path: Path, monkeypatch: Any) -> None:
    biggest = 0

    class Sink:
        """Wraps the real file to see that the log is written record by record, never as one string."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.file = open(*args, **kwargs)  # noqa: SIM115

        def write(self, data: bytes | str) -> int:
            nonlocal biggest
            biggest = max(biggest, len(data))
            return self.file.write(data)

        def writelines(self, lines: Any) -> None:
            for item in lines:
                self.write(item)

        def __enter__(self) -> Sink:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(generator, "open", Sink, raising=False)
    started = time.perf_counter()
    truth = write_corrupted_log(tmp_path / "big.json", n_events=10_000, seed=0, truth_path=tmp_path / "t.jsonl")
    assert time.perf_counter() - started < 10
    assert len(truth) == 10_000 and biggest < 64 * 1024
    assert (tmp_path / "big.json").stat().st_size == truth[-1].offset + truth[-1].length + 1
    assert sum(1 for r in read_file(tmp_path / "big.json") if r.ok) > 7000
