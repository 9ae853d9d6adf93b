"""The generator's logs are realistic, deterministic, and their ground truth is exact to the byte."""

from __future__ import annotations

import ast
import contextlib
import ipaddress
import itertools
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from dlq_assets.core import jsonutil
from dlq_assets.core.intake.reader import Record, read_file
from dlq_assets.devtools import generator
from dlq_assets.devtools.generator import BOM, KINDS, TruthRecord, generate_events, write_corrupted_log
from tests.conftest import REPO_ROOT

CATALOGUE = json.loads((REPO_ROOT / "dlq_assets/data/cowrie_eventids.json").read_text("utf-8"))
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
    from dlq_assets.core.cowrie import validate_event

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

# Kinds whose reading by the reader this file pins down; every kind is checked against reference decodes of
# its bytes (what the reader makes of the others is for the reader's own tests).
READER_KINDS = ("truncated", "trailing_comma", "bad_escape", "binary_junk", "missing_field", "invalid_value")
ON_ONE_LINE = ("concatenated", "after_restart")  # records that follow another on the same line
REAL_LOGS = sorted(Path("/work/shared/reference/real-cowrie").glob("cowrie.json.*"))
SEEDS = range(6)


def written(tmp_path: Path, name: str = "log", **options: Any) -> tuple[bytes, list[TruthRecord]]:
    """The bytes and the truth alone: the checks below are reference decodes, independent of the reader."""
    path = tmp_path / f"{name}.json"
    truth = write_corrupted_log(path, **options)
    return path.read_bytes(), truth


class DamagedRecord(NamedTuple):
    data: bytes  # the whole file
    truth: TruthRecord
    event: dict[str, Any]  # what generate_events drew
    raw: bytes  # the record's bytes


def damaged(tmp_path: Path, kind: str, n_events: int = 600, rate: float = 0.4) -> Iterator[DamagedRecord]:
    """Every record of ``kind`` over several seeds, with the event generate_events drew for it."""
    for seed in SEEDS:
        data, truth = written(
            tmp_path, f"{kind}-{seed}", n_events=n_events, seed=seed, corruption_rate=rate, kinds=[kind]
        )
        events = generate_events(n_events, seed=seed)
        assert len(truth) == n_events
        for record, event in zip(truth, events, strict=True):
            if record.corruption != "clean":
                yield DamagedRecord(data, record, event, data[record.offset : record.offset + record.length])


def clean_line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode()


def loads(text: str | bytes, **options: Any) -> Any:
    """Numbers read exactly, as jsonb reads them (a float original compares equal when it is exact)."""
    return json.loads(text, parse_float=Decimal, **options)


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def fails(text: str | bytes) -> bool:
    """Not strict JSON: no raw control characters, no NaN/Infinity."""
    try:
        json.loads(text, parse_constant=_refuse)
    except ValueError:
        return True
    return False


def from_python_literal(text: str) -> Any:
    """A ``repr`` of an event read back as JSON would read it: True/False/None as true/false/null, each float
    from the digits written (``ast.literal_eval`` would round them to binary floats)."""

    def convert(node: ast.expr) -> Any:
        if isinstance(node, ast.Dict):
            return {convert(k): convert(v) for k, v in zip(node.keys, node.values, strict=True)}
        if isinstance(node, ast.List):
            return [convert(item) for item in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, float):
            return Decimal(ast.get_source_segment(text, node) or "")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -convert(node.operand)
        return ast.literal_eval(node)

    return convert(ast.parse(text, mode="eval").body)


def reference_decode(data: bytes, record: TruthRecord) -> Any:
    """What the bytes of a recoverable record say, by the simplest decode that fits its kind."""
    raw = data[record.offset : record.offset + record.length]
    kind = record.corruption
    if kind in ("clean", "pretty", "bom", *ON_ONE_LINE):
        line = data[record.offset : data.index(b"\n", record.offset + record.length)].decode()
        value, end = json.JSONDecoder(parse_float=Decimal).raw_decode(line)
        assert len(line[:end].encode()) == record.length
        return value
    if kind in ("split_line", "control_character"):
        return loads(raw, strict=False)
    if kind == "python_literal":
        return from_python_literal(raw.decode())
    return _rebuild(kind, raw)


def lines_of(data: bytes, truth: list[TruthRecord]) -> list[list[TruthRecord]]:
    """The records grouped by the line that holds them (a BOM before a record is not part of it)."""
    lines: list[list[TruthRecord]] = []
    for record in truth:
        start = record.offset - 3 if data[record.offset - 3 : record.offset] == BOM else record.offset
        if start == 0 or data[start - 1 : start] == b"\n":
            lines.append([record])
        else:
            lines[-1].append(record)
    return lines


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    data, truth, _ = write(tmp_path, "a", n_events=500, seed=5)
    again, truth_again, _ = write(tmp_path, "b", n_events=500, seed=5)
    other, _, _ = write(tmp_path, "c", n_events=500, seed=6)
    assert data == again and truth == truth_again
    assert data != other


def test_originals_are_generate_events(tmp_path: Path) -> None:
    """Only split_line and control_character change an original: the producer's value held the raw character."""
    _, truth = written(tmp_path, n_events=400, seed=9, corruption_rate=0.5)
    events = generate_events(400, seed=9)
    assert len(truth) == len(events)
    for record, event in zip(truth, events, strict=True):
        if record.corruption not in ("split_line", "control_character"):
            assert record.original == event
            continue
        changed = [k for k in event if record.original[k] != event[k]]
        assert list(record.original) == list(event) and len(changed) == 1
        assert re.sub("[\r\n\t]", "", record.original[changed[0]]) == event[changed[0]]


def test_truth_offsets_match_the_bytes(tmp_path: Path) -> None:
    data, truth = written(tmp_path, n_events=1500, seed=1, corruption_rate=0.5)
    end = 0
    for record in truth:
        gap = data[end : record.offset]
        if record.corruption == "after_restart":
            assert gap == b""
        elif record.corruption == "concatenated" and gap in (b"", b" ", b"\t"):
            pass  # one of the events after the first on a concatenated line
        elif record.corruption == "bom":
            assert gap == (BOM if end == 0 else b"\n" + BOM)
        else:
            assert gap == (b"" if end == 0 else b"\n")
        written_bytes = data[record.offset : record.offset + record.length]
        if record.corruption == "clean":
            assert written_bytes == clean_line(record.original)
        if record.corruption == "pretty":
            assert written_bytes == json.dumps(record.original, indent=2, ensure_ascii=False).encode()
        end = record.offset + record.length
    assert data[end:] == b"\n"
    assert {t.corruption for t in truth} == {"clean", "after_restart", *KINDS}


def test_every_recoverable_record_decodes_to_its_original(tmp_path: Path) -> None:
    from dlq_assets.core.cowrie import validate_event

    checked: Counter[str] = Counter()
    for seed in range(3):
        data, truth = written(tmp_path, f"s{seed}", n_events=2000, seed=seed, corruption_rate=0.6)
        for record in truth:
            if record.recoverable:
                assert reference_decode(data, record) == record.original, record
                assert validate_event(record.original).valid
                checked[record.corruption] += 1
    recoverable = {"clean", "pretty", "truncated", "trailing_comma", "bad_escape", "split_line", "after_restart"}
    recoverable |= {"control_character", "concatenated", "python_literal", "bom"}
    assert set(checked) == recoverable


def test_truth_file_holds_the_same_truth(tmp_path: Path) -> None:
    truth = write_corrupted_log(tmp_path / "log", n_events=300, seed=2, truth_path=tmp_path / "truth.jsonl")
    lines = (tmp_path / "truth.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(text) for text in lines] == [json.loads(json.dumps(asdict(t))) for t in truth]


def test_clean_and_pretty_records_read_back_as_the_original(tmp_path: Path) -> None:
    kinds = ("pretty", *READER_KINDS)
    _, truth, records = write(tmp_path, n_events=2000, seed=4, corruption_rate=0.5, kinds=kinds)
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


@pytest.mark.parametrize("kind", READER_KINDS)
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
        elif kind in ("trailing_comma", "bad_escape"):
            assert [r.error for r in overlapping(records, record)] == ["json_parse_error"]
        elif kind == "binary_junk":
            assert b"\xff" in raw and not record.recoverable
            assert {r.error for r in overlapping(records, record)} & {"nul_byte", "invalid_utf8"}
        else:  # missing_field / invalid_value: valid JSON, wrong event
            assert not record.recoverable
            [read] = overlapping(records, record)
            assert read.ok and read.value != record.original
    expected_recoverable = kind in ("trailing_comma", "bad_escape")
    if kind != "truncated":
        assert all(t.recoverable is expected_recoverable for t in damaged)
    else:
        assert 0 < sum(t.recoverable for t in damaged) < len(damaged)


def _places(original: str, generated: str) -> set[str]:
    """The sorts of place where the producer's raw characters stand in the value."""
    i = next((i for i, (a, b) in enumerate(zip(original, generated, strict=False)) if a != b), len(generated))
    inserted = original[i : i + len(original) - len(generated)]
    assert original[:i] + original[i + len(inserted) :] == generated and inserted.strip("\r\n\t") == ""
    sorts = {"start"} if i == 0 else {"end"} if i == len(generated) else {"middle"}
    if generated[i - 1 : i] == " ":
        sorts.add("after_space")
    if generated[i : i + 1] == " ":
        sorts.add("before_space")
    if generated[i : i + 1] in ("{", "["):
        sorts.add("before_bracket")
    return sorts


@pytest.mark.parametrize("kind", ["split_line", "control_character"])
def test_raw_characters_in_a_value_are_the_producers_data(tmp_path: Path, kind: str) -> None:
    places: Counter[str] = Counter()
    inserted: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    for found in damaged(tmp_path, kind):
        record, raw = found.truth, found.raw
        assert raw.startswith(b"{") and record.recoverable
        assert loads(raw, strict=False) == record.original  # the raw characters are the value's own
        assert fails(raw)
        [key] = [k for k in found.event if record.original[k] != found.event[k]]
        sorts = _places(record.original[key], found.event[key])
        places.update(sorts)
        keys[key] += 1
        inserted[re.sub(r"[^\r\n\t]", "", record.original[key])] += 1
        if kind == "split_line":
            assert raw.count(b"\n") == 1 and "\n" in record.original[key]
            if "before_bracket" in sorts:
                assert raw.split(b"\n")[1][:1] in (b"{", b"[")  # the next line opens with a bracket at column 0
    assert places.keys() == {"start", "end", "middle", "after_space", "before_space", "before_bracket"}, places
    assert inserted.keys() == ({"\n"} if kind == "split_line" else {"\t", "\r", "\r\n"})
    assert {"message", "input"} <= keys.keys() and not keys.keys() & {"eventid", "timestamp", "session", "src_ip"}


def test_concatenated_events_share_one_line(tmp_path: Path) -> None:
    joins: Counter[bytes] = Counter()
    sizes: Counter[int] = Counter()
    for seed in SEEDS:
        data, truth = written(
            tmp_path, f"c{seed}", n_events=600, seed=seed, corruption_rate=0.3, kinds=["concatenated"]
        )
        assert [t.original for t in truth] == generate_events(600, seed=seed)
        for line in lines_of(data, truth):
            if line[0].corruption == "clean":
                continue
            sizes[len(line)] += 1
            text = data[line[0].offset : data.index(b"\n", line[-1].offset + line[-1].length)]
            assert fails(text) and b"\n" not in text
            for before, after in itertools.pairwise(line):
                joins[data[before.offset + before.length : after.offset]] += 1
            for record in line:
                assert record.corruption == "concatenated" and record.recoverable
                assert data[record.offset : record.offset + 1] == b"{"
                assert reference_decode(data, record) == record.original  # raw_decode at its offset
    assert joins.keys() == {b"", b" ", b"\t"} and sizes.keys() == {2, 3}


def test_restart_cuts_one_record_and_writes_the_next_whole(tmp_path: Path) -> None:
    cuts: list[float] = []
    ambiguous: list[bool] = []
    for seed in SEEDS:
        data, truth = written(tmp_path, f"r{seed}", n_events=600, seed=seed, corruption_rate=0.3, kinds=["restart"])
        assert [t.original for t in truth] == generate_events(600, seed=seed)
        for line in lines_of(data, truth):
            if line[0].corruption == "clean":
                continue
            cut, whole = line
            raw = data[cut.offset : cut.offset + cut.length]
            value_due = raw.rstrip(b" \t").endswith((b":", b",", b"[", b"{"))  # the whole one may be nested in it
            assert (cut.corruption, cut.recoverable, whole.corruption, whole.recoverable) == (
                "restart",
                False,
                "after_restart",
                not value_due,
            )
            ambiguous.append(value_due)
            full = clean_line(cut.original)
            assert raw.startswith(b"{") and full.startswith(raw) and 1 <= len(raw) <= len(full) - 2
            assert whole.offset == cut.offset + cut.length  # no separator
            assert data[whole.offset : whole.offset + whole.length] == clean_line(whole.original)
            assert data[whole.offset + whole.length : whole.offset + whole.length + 1] == b"\n"
            assert fails(raw) and fails(data[cut.offset : whole.offset + whole.length])
            assert reference_decode(data, whole) == whole.original
            cuts.append(len(raw) / len(full))
    assert len(cuts) > 40 and min(cuts) < 0.15 and max(cuts) > 0.85
    assert 0 < sum(ambiguous) < len(ambiguous) / 2


def test_python_literal_is_the_repr_of_the_event(tmp_path: Path) -> None:
    seen: Counter[str] = Counter()
    for found in damaged(tmp_path, "python_literal", n_events=1500, rate=0.3):
        record, raw = found.truth, found.raw
        assert raw == repr(record.original).encode() and record.original == found.event and record.recoverable
        assert fails(raw)
        assert from_python_literal(raw.decode()) == record.original
        values = list(record.original.values())
        seen["bool"] += any(isinstance(v, bool) for v in values)
        seen["float"] += any(isinstance(v, float) for v in values)
        seen["non_ascii"] += not raw.isascii()
        seen["quotes"] += any(isinstance(v, str) and "'" in v for v in values)
        seen["double_quotes"] += any(isinstance(v, str) and '"' in v for v in values)
        seen["backslash"] += b"\\\\" in raw
    assert all(seen[what] > 0 for what in ("bool", "float", "non_ascii", "quotes", "double_quotes", "backslash"))


def test_bom_stands_right_before_the_record(tmp_path: Path) -> None:
    count = 0
    for found in damaged(tmp_path, "bom", rate=0.2):
        record = found.truth
        assert found.data[record.offset - 3 : record.offset] == BOM and record.recoverable
        assert found.raw == clean_line(record.original) and record.original == found.event
        assert reference_decode(found.data, record) == record.original
        count += 1
    assert count > 100


def test_a_bom_can_start_the_file(tmp_path: Path) -> None:
    data, truth = written(tmp_path, "a", n_events=50, seed=1, bom=True, corruption_rate=0.0)
    assert data.startswith(BOM + b"{") and truth[0].offset == 3 and truth[0].corruption == "clean"
    assert data[3:] == b"".join(clean_line(event) + b"\n" for event in generate_events(50, seed=1))
    data, truth = written(tmp_path, "b", n_events=50, seed=1, bom=True, corruption_rate=1.0, kinds=["bom"])
    assert data.startswith(BOM + b"{") and truth[0].offset == 3 and truth[0].corruption == "bom"  # one mark
    data, _ = written(tmp_path, "c", n_events=50, seed=1, kinds=["pretty", "truncated"])
    assert not data.startswith(BOM)


def test_cut_at_field_keeps_whole_pairs_only(tmp_path: Path) -> None:
    ends: Counter[bytes] = Counter()
    kept: Counter[str] = Counter()
    for found in damaged(tmp_path, "cut_at_field"):
        record, raw = found.truth, found.raw
        assert not record.recoverable and record.original == found.event
        assert clean_line(record.original).startswith(raw) and fails(raw)
        body = raw.rstrip(b", ")
        ends[raw[len(body) :]] += 1
        pairs = loads(body + b"}")  # a whole pair ends the cut
        items = list(record.original.items())
        assert list(pairs.items()) == items[: len(pairs)] and 1 <= len(pairs) < len(items)
        kept["first" if len(pairs) == 1 else "last_but_one" if len(pairs) == len(items) - 1 else "middle"] += 1
    assert ends.keys() == {b"", b",", b", "} and kept.keys() == {"first", "middle", "last_but_one"}


def test_nan_replaces_one_number(tmp_path: Path) -> None:
    tokens: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    for found in damaged(tmp_path, "nan"):
        record, raw = found.truth, found.raw
        assert not record.recoverable and record.original == found.event and fails(raw)
        read = json.loads(raw)  # Python's json takes NaN and Infinity
        [key] = [k for k in read if read[k] != record.original[k] or read[k] != read[k]]
        assert isinstance(record.original[key], int | float) and not isinstance(record.original[key], bool)
        assert not math.isfinite(read[key])
        token = re.search(rb'"' + key.encode() + rb'": (-?Infinity|NaN)', raw)
        assert token is not None
        tokens[token.group(1).decode()] += 1
        keys[key] += 1
    assert tokens.keys() == {"NaN", "Infinity", "-Infinity"}
    assert {"src_port", "dst_port", "duration_ms", "width", "height"} <= keys.keys()


def test_nan_and_latin1_wait_for_an_event_they_fit(tmp_path: Path) -> None:
    for kind, fits in (
        ("nan", lambda e: any(isinstance(v, int | float) and not isinstance(v, bool) for v in e.values())),
        ("latin1", lambda e: any(isinstance(v, str) and re.search("[\x80-\xff]", v) for v in e.values())),
    ):
        _, truth = written(tmp_path, kind, n_events=1500, seed=2, corruption_rate=0.2, kinds=[kind])
        hit = [t.original for t in truth if t.corruption == kind]
        assert len(hit) > 15 and all(fits(e) for e in hit)


def test_latin1_bytes_are_not_utf8(tmp_path: Path) -> None:
    other_scripts = 0
    for found in damaged(tmp_path, "latin1", n_events=1500, rate=0.3):
        record, raw = found.truth, found.raw
        assert not record.recoverable and record.original == found.event
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
        as_written = {
            k: v.encode("latin-1", errors="replace").decode("latin-1") if isinstance(v, str) else v
            for k, v in record.original.items()
        }
        assert loads(raw.decode("latin-1")) == as_written
        assert re.search(rb"[\x80-\xff]", raw) and b"\xc3\xb1" not in raw  # ñ as one byte, not UTF-8's two
        other_scripts += as_written != record.original  # a character Latin-1 lacks became "?"
    assert other_scripts > 0


def test_kinds_follow_the_corruption_rate(tmp_path: Path) -> None:
    """The rate is per line: concatenated and restart lines take the next events with them."""
    data, truth = written(tmp_path, n_events=2000, seed=21, corruption_rate=0.3)
    lines = lines_of(data, truth)
    counts = Counter(line[0].corruption for line in lines)
    inside = sum(data[t.offset : t.offset + t.length].count(b"\n") for t in truth)
    assert len(truth) == 2000 and len(lines) == data.count(b"\n") - inside  # each line ends in one newline
    assert 0.25 < 1 - counts["clean"] / len(lines) < 0.35
    share = 0.3 * len(lines) / len(KINDS)
    assert all(0.5 * share < counts[kind] < 1.5 * share for kind in KINDS), counts


def test_rate_zero_is_all_clean_and_unknown_kinds_are_refused(tmp_path: Path) -> None:
    _, truth, records = write(tmp_path, n_events=300, seed=1, corruption_rate=0.0)
    assert {t.corruption for t in truth} == {"clean"} and all(r.ok for r in records)
    with pytest.raises(ValueError):
        write_corrupted_log(tmp_path / "x", n_events=1, kinds=["gremlins"])


# --- real Cowrie logs -----------------------------------------------------------------------------------------


def real_lines() -> list[bytes]:
    return [line for path in REAL_LOGS for line in path.read_bytes().splitlines()]


@pytest.mark.skipif(not REAL_LOGS, reason="the 2018 Cowrie logs are not on this machine")
def test_real_events_are_damaged_and_their_numbers_kept(tmp_path: Path) -> None:
    lines = real_lines()
    events = [json.loads(line, parse_float=Decimal) for line in lines]
    checked: Counter[str] = Counter()
    for seed in range(3):
        source = (json.loads(line, parse_float=Decimal) for line in lines)  # any iterable, read lazily
        data, truth = written(tmp_path, f"real{seed}", n_events=2500, seed=seed, corruption_rate=0.6, events=source)
        again, _ = written(tmp_path, f"again{seed}", n_events=2500, seed=seed, corruption_rate=0.6, events=events)
        assert data == again and len(truth) == 2500  # n_events caps the events used
        for record, event, line in zip(truth, events, lines, strict=False):
            raw = data[record.offset : record.offset + record.length]
            if record.corruption in ("split_line", "control_character"):
                assert [k for k in event if record.original[k] != event[k]] and record.original.keys() == event.keys()
            else:
                assert record.original == event
            if record.corruption in ("clean", "bom", "concatenated", "after_restart"):
                assert raw == line  # the very bytes Cowrie wrote, numbers and key order included
            if record.corruption not in ("truncated", "restart", "cut_at_field", "binary_junk", "nan"):
                numbers = [str(v).encode() for v in record.original.values() if isinstance(v, Decimal)]
                assert all(number in raw for number in numbers)
                checked["decimal"] += len(numbers)
            if record.recoverable:
                assert reference_decode(data, record) == record.original
            checked[record.corruption] += 1
    # The real logs hold no non-ASCII text and no backslash that JSON lacks an escape for: latin1 and
    # bad_escape wait for an event they fit, which never comes.
    assert checked.keys() == {"clean", "after_restart", "decimal", *KINDS} - {"latin1", "bad_escape"}
    assert checked["decimal"] > 500


def test_decimal_numbers_are_written_as_they_were_read(tmp_path: Path) -> None:
    line = '{"eventid": "cowrie.session.closed", "duration": 1.1534101963043213, "x": [0.10, 2.50], "n": 3}'
    event = json.loads(line, parse_float=Decimal)
    for kind in ("pretty", "python_literal", "concatenated"):
        data, truth = written(tmp_path, kind, n_events=5, corruption_rate=1.0, kinds=[kind], events=[event] * 5)
        raw = data[truth[0].offset : truth[0].offset + truth[0].length]
        for number in (b"1.1534101963043213", b"0.10", b"2.50"):
            assert number in raw
        if kind == "python_literal":
            assert from_python_literal(raw.decode()) == event
        else:
            assert loads(raw) == event
    data, _ = written(tmp_path, "clean", n_events=1, corruption_rate=0.0, events=[event])
    assert data == line.encode() + b"\n"


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
