"""The reader splits by depth and string state: every byte of a record kept, every record whole, no line guessing."""

from __future__ import annotations

import io
import json
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dlq_assets.core.intake.reader import Record, _Scanner, read_file, read_records
from tests.conftest import SHARED_REFERENCE, TEST_DATA

_REFERENCE_NAME = "cowrieprocessor_repair_cases.jsonl"
_SHARED_REFERENCE = SHARED_REFERENCE / _REFERENCE_NAME
_LOCAL_REFERENCE = TEST_DATA / _REFERENCE_NAME
_WS = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"

EVENT: dict[str, Any] = {
    "eventid": "cowrie.client.kex",
    "hassh": "f555226df1963d1d3c09daf865abdc9a",
    "kexAlgs": ["curve25519-sha256", "ecdh-sha2-nistp256"],
    "nested": {"a": [1, {"b": [2, 3]}], "c": {}},
    "input": 'echo "{not a bracket}" \\ [x] é ✓',
    "session": "3f2a9c0b1d4e",
}


def read(data: bytes, **options: Any) -> list[Record]:
    """Read ``data`` and check the invariant every test relies on: each raw is exactly the bytes at its offset."""
    records = list(read_records(io.BytesIO(data), **options))
    for record in records:
        assert data[record.offset : record.offset + len(record.raw)] == record.raw
    return records


def summary(records: list[Record]) -> list[tuple[bytes, str | None]]:
    return [(r.raw, r.error) for r in records]


def line(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


# --- basics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"   ", b"\n\n", b" \t\r\n \r\n"])
def test_empty_or_blank_input_has_no_records(data: bytes) -> None:
    assert read(data) == []


def test_single_line_records_with_exact_offsets() -> None:
    data = line(EVENT) + b"\n" + b'{"a": 1}\n' + b"[1, 2]"  # no trailing newline on the last one
    records = read(data)
    assert [r.offset for r in records] == [0, len(line(EVENT)) + 1, len(line(EVENT)) + 10]
    assert all(r.ok for r in records)
    assert records[0].value == EVENT
    assert records[1].value == {"a": Decimal(1)} and records[2].value == [1, 2]


def test_record_is_frozen_and_ok_follows_error() -> None:
    record = Record(0, b"x", error="json_parse_error")
    assert not record.ok and Record(0, b"{}", {}).ok
    with pytest.raises(AttributeError):
        record.offset = 3  # type: ignore[misc]


def test_crlf_and_trailing_blanks_are_not_part_of_the_record() -> None:
    pretty = json.dumps(EVENT, indent=2, ensure_ascii=False).replace("\n", "\r\n").encode()
    data = b'{"a": 1}  \t\r\n' + pretty + b"\r\n" + b"garbage  \r\n  " + b'{"b": 2}\r\n'
    records = read(data)
    assert summary(records) == [
        (b'{"a": 1}', None),
        (pretty, None),
        (b"garbage", "json_parse_error"),
        (b'{"b": 2}', None),
    ]
    assert records[1].value == EVENT


@pytest.mark.parametrize("indent", [2, 4])
def test_pretty_printed_objects_are_one_record(indent: int) -> None:
    pretty = json.dumps(EVENT, indent=indent, ensure_ascii=False).encode()
    records = read(pretty + b"\n" + pretty)
    assert [(r.offset, r.raw, r.value) for r in records] == [
        (0, pretty, EVENT),
        (len(pretty) + 1, pretty, EVENT),
    ]


def test_mixture_of_single_line_and_pretty_printed() -> None:
    events = [{**EVENT, "n": i} for i in range(6)]
    parts = [line(e) if i % 2 else json.dumps(e, indent=2 + i % 3).encode() for i, e in enumerate(events)]
    records = read(b"\n".join(parts) + b"\n")
    assert [r.value for r in records] == events
    assert [r.raw for r in records] == parts


def test_read_file_streams_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "cowrie.json"
    path.write_bytes(line(EVENT) + b"\n{\n")
    assert summary(list(read_file(path))) == [(line(EVENT), None), (b"{", "truncated")]
    assert [r.raw for r in read_file(str(path))] == [line(EVENT), b"{"]


def test_reading_is_lazy() -> None:
    stream = io.BytesIO(b'{"a": 1}\n' * 100_000)
    first = next(read_records(stream, chunk_size=4096))
    assert first.value == {"a": 1}
    assert stream.tell() <= 4096


# --- the scanning rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hello world\n", [(b"hello world", "json_parse_error")]),
        (b"}\n],\n  ]  \n", [(b"}", "json_parse_error"), (b"],", "json_parse_error"), (b"]", "json_parse_error")]),
        (b"not JSON {{{[[[]]]}}}\n", [(b"not JSON {{{[[[]]]}}}", "json_parse_error")]),
        (b'"a bare string"\n42\n', [(b'"a bare string"', None), (b"42", None)]),
    ],
)
def test_anything_else_is_a_record_to_the_end_of_its_line(
    data: bytes, expected: list[tuple[bytes, str | None]]
) -> None:
    assert summary(read(data)) == expected


def test_raw_newline_inside_a_string_is_data_and_the_record_goes_on() -> None:
    data = b'{"eventid": "cowrie\n", "session": "abc123"}\n{"a": 1}\n'
    assert summary(read(data)) == [
        (b'{"eventid": "cowrie\n", "session": "abc123"}', "json_parse_error"),  # JSON forbids it; repair keeps it
        (b'{"a": 1}', None),
    ]


@pytest.mark.parametrize("indent", [b"", b"  ", b"\t "])
def test_a_string_cut_where_the_next_line_opens_a_record_ends_there_blanks_kept(indent: bytes) -> None:
    data = b'{"a": "cut \t\n' + indent + b'{"b": 1}\n'
    assert summary(read(data)) == [(b'{"a": "cut \t', "truncated"), (b'{"b": 1}', None)]


def test_backslash_never_escapes_a_raw_newline() -> None:
    data = b'{"path": "C:\\\n{"a": 1}\n'
    assert summary(read(data)) == [(b'{"path": "C:\\', "truncated"), (b'{"a": 1}', None)]


def test_column_zero_brace_starts_a_new_record() -> None:
    data = b'{\n  "eventid": "cowrie.session.connect",\n  "nested": {\n{"a": 1}\n'
    assert summary(read(data)) == [
        (b'{\n  "eventid": "cowrie.session.connect",\n  "nested": {', "truncated"),
        (b'{"a": 1}', None),
    ]


def test_indented_brace_and_column_zero_close_continue_the_record() -> None:
    data = b'{\n "a": [\n {"b": 1}\n]\n}\n'
    assert summary(read(data)) == [(data.strip(), None)]


@pytest.mark.parametrize(
    "data", [b"{", b'{"a": [1, 2', b'{"a": "unterminated', b'{"a": "x\\', b'[{"a": 1}', b'{"a": 1}\n[\n']
)
def test_truncated_by_end_of_file(data: bytes) -> None:
    assert read(data)[-1].error == "truncated"


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1},',
        b'{"a":1} junk',
        b'{"a": 1}\t, ',
        b"[1, 2]]",
    ],
)
def test_extra_bytes_after_the_close_make_the_whole_line_the_record(data: bytes) -> None:
    records = read(data + b"\n" + b'{"next": true}\n')
    assert summary(records) == [(data.rstrip(_WS), "json_parse_error"), (b'{"next": true}', None)]


@pytest.mark.parametrize("between", [b"", b" ", b"\t", b" \t  "])
def test_values_concatenated_on_one_line_are_records_of_their_own(between: bytes) -> None:
    data = b'{"a": 1}' + between + b'{"b": [2]}' + between + b"[3]" + between + b'{"c": "cut'
    first, second = 8 + len(between), 18 + 2 * len(between)
    assert [(r.offset, r.raw, r.error) for r in read(data)] == [
        (0, b'{"a": 1}', None),
        (first, b'{"b": [2]}', None),
        (second, b"[3]", None),
        (second + 3 + len(between), b'{"c": "cut', "truncated"),
    ]


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 64])
def test_a_byte_order_mark_before_a_record_is_skipped_and_flagged(chunk_size: int) -> None:
    bom = b"\xef\xbb\xbf"
    data = bom + b'{"a": 1}\n' + bom + b'  {"b": 2}{"c": 3}' + bom + b'{"d": 4}\n\xef\xbb{"e": 5}\n'
    records = read(data, chunk_size=chunk_size)
    assert [(r.offset, r.raw, r.bom) for r in records] == [
        (3, b'{"a": 1}', True),
        (17, b'{"b": 2}', True),
        (25, b'{"c": 3}', False),
        (36, b'{"d": 4}', True),
        (45, b'\xef\xbb{"e": 5}', False),  # not a whole mark: bytes of the record, kept
    ]
    assert [r.error for r in records] == [None, None, None, None, "invalid_utf8"]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 64])
@pytest.mark.parametrize("cut", [b'{"a": "cut', b'{"a": [1, 2'])
def test_a_byte_order_mark_opening_the_next_line_ends_a_cut_record(chunk_size: int, cut: bytes) -> None:
    data = cut + b"\n\xef\xbb\xbf" + b'{"b": 1}\n'
    records = read(data, chunk_size=chunk_size)
    assert [(r.offset, r.raw, r.error, r.bom) for r in records] == [
        (0, cut, "truncated", False),
        (len(cut) + 4, b'{"b": 1}', None, True),
    ]


def test_a_cut_record_followed_on_its_line_by_a_whole_one_is_split_when_asked() -> None:
    whole = line(EVENT)
    data = b'{"eventid": "cowrie.login.fa' + whole + b'\n{"port": 22' + whole + b"\n" + b'{"x": {"y": 1}\n'
    plain = read(data)
    assert len(plain) == 3 and all(r.error in ("truncated", "json_parse_error") for r in plain)
    with io.BytesIO(data) as stream:
        split = list(read_records(stream, accept=lambda v: "eventid" in v))
    assert [(r.offset, r.raw, r.error) for r in split] == [
        (0, b'{"eventid": "cowrie.login.fa', "truncated"),
        (28, whole, None),
        (29 + len(whole), b'{"port": 22', "truncated"),
        (40 + len(whole), whole, None),
        (41 + 2 * len(whole), b'{"x": {"y": 1}', "truncated"),  # a nested object the predicate refuses stays put
    ]
    assert split[1].value == EVENT


def test_blanks_after_the_close_are_not_extra_bytes() -> None:
    assert summary(read(b'{"a": 1}  \t \r\n{"b": 2}   ')) == [(b'{"a": 1}', None), (b'{"b": 2}', None)]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b'{"a": "\xff"}', "invalid_utf8"),
        (b'{"a": "\xc3"}', "invalid_utf8"),
        (b"\xfe\xfe garbage", "invalid_utf8"),
        (b'{"a": "\x00"}', "nul_byte"),
        (b'{"a": "\x00\xff"}', "nul_byte"),  # a NUL is checked before decoding
        (b"\x00", "nul_byte"),
        (b'{"a": "\\u0000"}', "not_storable_json"),
        (b'{"a": "\\ud800"}', "not_storable_json"),
        (b'{"a": NaN}', "not_storable_json"),  # jsonutil: "JSON, or almost", never a jsonb number
        (b'{"a": 1e999999999}', "not_storable_json"),  # JSON, but no PostgreSQL numeric holds it
        (b'{"a": 1e9999999999999999999}', "not_storable_json"),  # nor a Python Decimal
        (b"{\"a\": 'single'}", "json_parse_error"),
        (b'{"a": "tab\there"}', "json_parse_error"),
        (b'{"a": "C:\\Users"}', "json_parse_error"),
    ],
)
def test_error_codes(data: bytes, error: str) -> None:
    records = read(data + b"\n" + b'{"ok": 1}\n')
    assert summary(records) == [(data, error), (b'{"ok": 1}', None)]


def test_valid_utf8_and_escapes_parse() -> None:
    data = line({"a": "é ✓ 你好 😀", "b": 'q"\\/\b\f\n\r\t\x16'}) + b"\n"
    [record] = read(data)
    assert record.value == {"a": "é ✓ 你好 😀", "b": 'q"\\/\b\f\n\r\t\x16'}


def test_too_deeply_nested_is_never_parsed() -> None:
    deep = b"[" * 513 + b"]" * 513
    ok = b"[" * 512 + b"]" * 512
    assert summary(read(deep + b"\n" + ok)) == [(deep, "too_deeply_nested"), (ok, None)]
    assert read(b'{"a": [[[1]]]}', max_depth=3)[0].error == "too_deeply_nested"
    assert read(b'{"a": [[1]]}', max_depth=3)[0].ok


def test_enormous_nesting_raises_no_recursion_error() -> None:
    for data in (b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 100_000, b"[" * 100_000 + b"\n{}"):
        records = read(data)
        assert records[0].error == "too_deeply_nested"
    assert read(b"[" * 3000 + b"]" * 3000, max_depth=10**6)[0].error == "too_deeply_nested"


@pytest.mark.parametrize("chunk_size", [1, 3, 64, 65536])
def test_record_too_large_is_emitted_in_chunks(chunk_size: int) -> None:
    big = line({"data": "x" * 95})
    data = b'{"a": 1}\n' + big + b"   \n" + b"y" * 30 + b"\n" + b"z" * 10 + b"\n"
    records = read(data, max_record_bytes=20, chunk_size=chunk_size)
    pieces = [r for r in records if r.error == "record_too_large"]
    assert b"".join(r.raw for r in pieces) == big + b"y" * 30
    assert all(0 < len(r.raw) <= 20 for r in pieces)
    assert [len(r.raw) for r in pieces if r.raw[0:1] != b"y"] == [20, 20, 20, 20, 20, 7]
    assert summary([records[0], records[-1]]) == [(b'{"a": 1}', None), (b"z" * 10, "json_parse_error")]


def test_record_of_exactly_the_limit_is_not_too_large() -> None:
    assert summary(read(b"x" * 20 + b"    \n" + b"{}", max_record_bytes=20)) == [
        (b"x" * 20, "json_parse_error"),
        (b"{}", None),
    ]


def test_memory_is_bounded_by_the_record_cap_not_the_file() -> None:
    data = (line(EVENT) + b"\n") * 2000 + b"J" * 300_000 + b"\n" + line(EVENT)
    scanner = _Scanner(io.BytesIO(data), 10_000, 512, 4096)
    peak, count = 0, 0
    for _ in scanner.records():
        peak, count = max(peak, len(scanner.buf)), count + 1
    assert count == 2000 + 30 + 1
    assert peak <= 10_000 + 4096


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_a_record_holding_a_long_run_of_blanks_is_cut_in_pieces_with_the_buffer_bounded(chunk_size: int) -> None:
    """Blanks inside an open record are scanned once, and a cap of them past the cap makes the record too large:
    held whole, a run of blanks grew the buffer with the run and was scanned again at every fill."""
    data = b'{"a": 1,' + b" " * 100_000 + b'"b": 2}\n{"c": 3}\n' + b'{"d": ' + b" \t\r\n" * 30_000
    scanner = _Scanner(io.BytesIO(data), 1000, 512, chunk_size)
    records, peak = [], 0
    for record in scanner.records():
        records.append(record)
        peak = max(peak, len(scanner.buf))
    assert peak <= 2 * 1000 + chunk_size
    first, second, third = records[:101], records[101], records[102:]
    assert b"".join(r.raw for r in first) == data[: data.index(b"\n")] and len(first[-1].raw) == 15
    assert summary([second]) == [(b'{"c": 3}', None)]
    # the cut last record: pieces while two caps of it remain, then the blanks trailing the last piece dropped
    assert b"".join(r.raw for r in third) == data[second.offset + 9 : len(data) - 1006]
    assert {r.error for r in first + third} == {"record_too_large"} and {len(r.raw) for r in third} == {1000}
    assert records == read(data, max_record_bytes=1000)


def test_a_record_followed_by_blanks_short_of_two_caps_keeps_its_fault() -> None:
    """Under two caps of blanks the reader holds them, and they trail the record: it is cut, not too large."""
    assert summary(read(b'{"a": ' + b" " * 1990, max_record_bytes=1000)) == [(b'{"a":', "truncated")]


# --- chunk boundaries and arbitrary bytes -------------------------------------------------------------------

CORPUS = b"\n".join(
    [
        line(EVENT),
        json.dumps(EVENT, indent=2).encode(),
        json.dumps(EVENT, indent=4, ensure_ascii=False).encode().replace(b"\n", b"\r\n"),
        b'{"eventid": "cowrie', b'", "session": "abc123"}',
        b"{", b'  "eventid": "partial', line(EVENT),
        b'{"a": 1},', b'{"a": "C:\\Users\\x"}', b'{"a": "x\\\\"} tail', b"\xff\x00 junk",
        b"[" * 600 + b"]" * 600, b'{"a": "\\u0000"}', b"  {\"nested\": {", b"{}", b"   ",
        b'{"k": "v\\"}', b'{"k": "v"}}', b"]", b'{"unfinished": [1, 2',
    ]
)  # fmt: skip


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 16, 61, 256])
def test_chunk_boundaries_do_not_change_the_records(chunk_size: int) -> None:
    expected = read(CORPUS)
    assert read(CORPUS, chunk_size=chunk_size) == expected
    assert read(CORPUS, chunk_size=chunk_size, max_record_bytes=50) == read(CORPUS, max_record_bytes=50)
    parse, cut = "json_parse_error", "truncated"
    assert [r.error for r in expected] == [
        *(None, None, None, parse, cut, None, parse, parse, parse, "nul_byte", "too_deeply_nested"),
        *("not_storable_json", cut, None, cut, parse, parse, cut),
    ]


_TOKENS = st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"', b"\\", b"\n", b"\r\n", b" ", b"\t", b",", b":", b"a", b"1", b"\x00", b"\xff",
     b"\xc3\xa9", b'{"a": 1}', b'"k": "v"', b"\n{", b"\n}", b"null", b"\xef\xbb\xbf"]
)  # fmt: skip
_DATA = st.one_of(st.binary(max_size=300), st.lists(_TOKENS, max_size=80).map(b"".join))


@settings(max_examples=400, deadline=None)
@given(
    data=_DATA,
    chunk_size=st.integers(1, 70),
    max_record_bytes=st.integers(1, 400),
    max_depth=st.integers(1, 6),
)
@example(data=b'{\x00"\t\n{', chunk_size=1, max_record_bytes=4, max_depth=1)  # cut in a string, and a NUL in it
def test_property_records_cover_every_non_blank_byte_in_order(
    data: bytes, chunk_size: int, max_record_bytes: int, max_depth: int
) -> None:
    options = {"max_record_bytes": max_record_bytes, "max_depth": max_depth}
    records = read(data, chunk_size=chunk_size, **options)
    position = 0
    for record in records:
        assert record.offset >= position and record.raw  # in order, disjoint, never empty
        gap = data[position : record.offset]
        assert gap.replace(_BOM, b"").strip(_WS) == b""  # only blanks between records, and skipped marks
        assert record.bom == (_BOM in gap)
        assert len(record.raw) <= max_record_bytes
        assert record.error is None or record.value is None
        if record.error != "record_too_large":  # a string cut at a line end keeps its blanks (data) ...
            assert record.raw.lstrip(_WS) == record.raw
            # ... a record cut inside a string, so truncated, unless a byte-level fault in it says more
            assert record.raw.rstrip(_WS) == record.raw or record.error in ("truncated", "nul_byte", "invalid_utf8")
        position = record.offset + len(record.raw)
    assert data[position:].strip(_WS) == b""
    assert read(data, **options) == records  # chunking never matters


# --- the reference cases ------------------------------------------------------------------------------------


def _reference_cases() -> list[dict[str, Any]]:
    if not _LOCAL_REFERENCE.exists() and _SHARED_REFERENCE.exists():
        _LOCAL_REFERENCE.parent.mkdir(exist_ok=True)
        shutil.copyfile(_SHARED_REFERENCE, _LOCAL_REFERENCE)
    path = _SHARED_REFERENCE if _SHARED_REFERENCE.exists() else _LOCAL_REFERENCE
    cases = [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines() if text.strip()]
    return [case for case in cases if case["kind"] in ("stream", "line_parse")]


# What our reader yields for each case: (error of each record in order, None = parsed). The line-based anchor
# dead-letters or splits several of these; a record reader keeps them whole. Sanitising control characters or
# NUL escapes is the repairer's business, not the reader's: it reports what jsonb would say.
READER_EXPECTATIONS: dict[str, list[str | None]] = {
    "unicode-escaped-nul": ["not_storable_json"],
    "unicode-escaped-syn": [None],
    "unicode-escaped-soh-filename": [None],
    "hybrid-single-line": [None],
    "hybrid-multiline-object": [None],
    "hybrid-mixed": [None, None, None],
    "hybrid-empty-lines": [None],
    "hybrid-buffer-too-large": ["json_parse_error"] * 3,  # one dead letter per garbage line, not one blob
    "hybrid-eof-incomplete": ["truncated"],
    "hybrid-split-string-token": ["json_parse_error"],  # the raw newline is data: one record
    "hybrid-buffer-interrupted": ["truncated", None],
    "hybrid-stats-mix": [None, None] + ["json_parse_error"] * 5,
    "doc-mixed-single-multiline": [None, None],
    "derived-hybrid-splits-pretty-kex": [None],
}


def test_every_reference_case_has_an_expectation() -> None:
    cases = _reference_cases()
    assert sorted(case["id"] for case in cases) == sorted(READER_EXPECTATIONS)
    assert sum(case["kind"] == "stream" for case in cases) == 11


@pytest.mark.parametrize("case", _reference_cases(), ids=lambda case: case["id"])
def test_reference_case(case: dict[str, Any]) -> None:
    text = case["input"] if case["kind"] == "line_parse" else "\n".join(case["input"])
    data = text.encode()
    records = read(data)
    assert [r.error for r in records] == READER_EXPECTATIONS[case["id"]]
    expected = case["expected"]
    parsed = [r for r in records if r.ok]
    if isinstance(expected.get("events"), list):  # exact events with their offsets
        assert [(r.offset, r.value) for r in parsed] == [(e["offset"], e["event"]) for e in expected["events"]]
    if "event_count" in expected:
        assert len(parsed) == expected["event_count"]
    if type(expected.get("dlq")) is int:  # (line_parse cases hold a bool there)
        assert len(records) - len(parsed) == expected["dlq"]
    if isinstance(expected.get("dlq"), list):  # the anchor's one dead letter holds our first one
        assert expected["dlq"][0].get("malformed_content_contains", "").encode() in records[0].raw
    if "results" in expected:
        for result, record in zip(expected["results"], records, strict=True):
            assert result["dlq"] is not record.ok
            assert result.get("event_subset", {}).items() <= (record.value or {}).items()
    if "results_at_least" in expected:
        assert len(records) >= expected["results_at_least"]
    if "single_line_parsed_ge" in expected:
        assert sum(b"\n" not in r.raw for r in parsed) >= expected["single_line_parsed_ge"]
        assert sum(b"\n" in r.raw for r in parsed) >= expected["multiline_parsed_ge"]
        assert len(records) - len(parsed) >= expected["dlq_sent_ge"]
    if case["kind"] == "line_parse" and records[0].ok:  # kept exactly: stripping control bytes is not our job
        assert records[0].value == json.loads(text)
