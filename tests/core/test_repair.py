"""Repair never invents data: every repaired event is one the input held, checked against ground truth."""

from __future__ import annotations

import bisect
import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlq_assets.core import jsonutil, repair
from dlq_assets.core.cowrie import REQUIRED_ATTRIBUTES, validate_event
from dlq_assets.core.intake.reader import read_records
from dlq_assets.core.repair import (
    MAX_GROUP,
    MAX_INPUT_BYTES,
    STRATEGIES,
    Fragment,
    RepairResult,
    raw_bytes_of,
    repair_record,
    stitch_fragments,
    tokenizer_fix,
)
from dlq_assets.devtools.generator import generate_events, write_corrupted_log
from tests.conftest import REPO_ROOT, TEST_DATA

_DATA = TEST_DATA / "cowrieprocessor_repair_cases.jsonl"
_CATALOGUE = json.loads((REPO_ROOT / "dlq_assets/data/cowrie_eventids.json").read_text())

# Current Cowrie's layout: the event's own attributes, then message, sensor, timestamp, src_ip, session.
LOGIN = {
    "eventid": "cowrie.login.failed",
    "username": "root",
    "password": "admin",
    "message": "login attempt [root/admin] failed",
    "sensor": "hp1",
    "timestamp": "2024-01-15T10:30:00.123456Z",
    "src_ip": "203.0.113.10",
    "session": "3f2a9c0b1d4e",
}
# A real 2018 Cowrie line (from the reference file): there the output layer appended sensor after session.
LOGIN_2018 = (
    '{"eventid": "cowrie.login.failed", "username": "raspberry", "password": "admin", "timestamp": '
    '"2018-09-05T13:52:42.584350Z", "message": "login attempt [raspberry/admin] failed", "src_ip": '
    '"193.201.224.214", "session": "5d77535d8ac4", "sensor": "honeypot-ssh"}'
)


def line(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False)


def canonical(value: Any) -> str:
    return jsonutil.canonical_json(value)


def assert_repaired(result: RepairResult, strategy: str, original: dict[str, Any]) -> None:
    assert (result.repaired, result.strategy, result.reason) == (True, strategy, None), result
    assert canonical(result.event) == canonical(jsonutil.loads(line(original)))


def assert_refused(result: RepairResult, reason: str) -> None:
    assert (result.event, result.strategy) == (None, None), result
    assert result.reason is not None and result.reason.startswith(reason), result.reason


# --- strategies ---------------------------------------------------------------------------------------------


def test_as_is_takes_a_valid_event_unchanged() -> None:
    assert_repaired(repair_record(line(LOGIN).encode()), "as_is", LOGIN)
    assert_repaired(repair_record(f"\n  {line(LOGIN)}  \r\n"), "as_is", LOGIN)


def test_valid_json_that_fails_the_catalogue_is_refused_not_filled() -> None:
    login = {k: v for k, v in LOGIN.items() if k not in ("username", "password")}
    assert_refused(repair_record(line(login)), "validation_failed: missing_required_field: username")
    assert_refused(repair_record(line({**LOGIN, "eventid": "cowrie.system.info"})), "validation_failed: unknown")
    assert_refused(repair_record(line({**LOGIN, "session": "session0"})), "validation_failed: invalid_session")


@pytest.mark.parametrize(
    "text",
    [
        line(LOGIN)[:-1] + ",}",
        line(LOGIN)[:-1] + " ,\n }",
        line({**LOGIN, "kexAlgs": ["a", "b"]}).replace('"b"]', '"b",]'),
        line({**LOGIN, "kexAlgs": ["a", "b"]}).replace('"b"]', '"b" , ]')[:-1] + ",}",
    ],
)
def test_tokenizer_drops_trailing_commas(text: str) -> None:
    expected = jsonutil.loads(text.replace(",}", "}").replace(" ,\n }", "\n }").replace(",]", "]").replace(", ]", "]"))
    result = repair_record(text)
    assert (result.strategy, canonical(result.event)) == ("tokenizer_fix", canonical(expected))


@pytest.mark.parametrize(
    ("written", "value"),
    [
        (r"echo -e '\x41\x41'", r"echo -e '\x41\x41'"),
        (r"dir C:\Users\Public", r"dir C:\Users\Public"),
        (r"type C:\users\x.txt", r"type C:\users\x.txt"),  # \u not followed by four hex digits
        (r"grep -E '^\S+\s+\d+' \"q\"", "grep -E '^\\S+\\s+\\d+' \"q\""),  # an escaped quote stays one
    ],
)
def test_tokenizer_doubles_stray_backslashes_only(written: str, value: str) -> None:
    text = line({**LOGIN, "input": "PLACEHOLDER"}).replace("PLACEHOLDER", written)
    result = repair_record(text)
    assert result.strategy == "tokenizer_fix" and result.event is not None
    assert result.event["input"] == value


@pytest.mark.parametrize(
    "written",
    [r"grep -E '^\S+' \n", r"C:\Users\new\file.txt", r"\u00e9\u00", r"C:\Temp\\x", r"a\/b \q"],
)
def test_a_stray_backslash_beside_escapes_is_two_readings_and_refused(written: str) -> None:
    text = line({**LOGIN, "input": "PLACEHOLDER"}).replace("PLACEHOLDER", written)
    assert_refused(repair_record(text), "ambiguous_escape")
    assert_refused(repair_record(text[:-1] + ",}"), "ambiguous_escape")


def test_tokenizer_closes_brackets_after_a_complete_value() -> None:
    kex = {**LOGIN, "eventid": "cowrie.client.kex", "kexAlgs": ["a", "b"]}
    assert_repaired(repair_record(line(kex)[:-1]), "truncation_closed", kex)
    nested = {**LOGIN, "late": [{"x": [True]}]}  # the tokenizer closes with a stack: "]}]}", not by counting
    assert line(nested).endswith("]}]}")
    assert tokenizer_fix(line(nested)[:-4]) == (line(nested), None)
    # ... but a repair closes the event only: a list cut open may have lost elements, not just later pairs
    assert_refused(repair_record(line(nested)[:-4]), "truncated_value: a nested value is open")
    kex_cut = line(kex)[: line(kex).index('"b"') + 3]
    assert_refused(repair_record(kex_cut), "truncated_value: a nested value is open")
    for value in ("true", "false", "null", '"x"', "[]", "{}", '["a"]'):
        text = '{"a": {"b": [1, VALUE]}}'.replace("VALUE", value)
        for cut in (1, 2, 3):
            assert tokenizer_fix(text[:-cut] + "  \n") == (text[:-cut] + "  \n" + text[-cut:], None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (line(LOGIN)[:-3], "truncated_value"),  # inside the session string
        ('{"eventid": "cowrie.session.closed", "duration_ms": 522', "truncated_value"),  # 522 of 52213?
        ('{"eventid": "cowrie.session.closed", "duration_ms": 522  ', "truncated_value"),
        ('{"eventid": "cowrie.session.closed", "duration_ms": -', "truncated_value"),
        ('{"eventid": "cowrie.session.closed", "duplicate": tr', "truncated_value"),
        ('{"eventid": "cowrie.session.closed", "x":', "truncated_value"),
        ('{"eventid": "cowrie.session.closed",', "truncated_value"),
        ('{"eventid": "cowrie.session.closed", "x"', "truncated_value"),
        ('{"eventid": "cowrie.session.closed", "x": [', "truncated_value"),
        ('{"eventid": "cowrie.session.closed", "x": "a\\', "truncated_value"),
        ("{", "truncated_value"),
        ("this is not JSON at all {{{[[[]]]}}}", "not_json"),
        ("", "not_json"),
        ("{invalid json", "not_json"),
        ('{"invalid": json}', "not_json"),
        ("{'key': ('a', 'tuple')}", "not_json"),  # no JSON value: no Python literal of ours either
        ("{'key': b'bytes'}", "not_json"),
        ("{'key': float('nan')}", "not_json"),
        ("{1: 'a'}", "not_json"),
        ("{'key': 0x1f}", "not_json"),
        ("{'key': value}", "not_json"),
        ('{"a": NaN}', "not_storable"),  # jsonutil: NaN is no JSON number, and jsonb has none
        ('{"a": 01}', "not_json"),
        ('{"a": 1.}', "not_json"),
        ('{"a": 1 "b": 2}', "not_json"),
        ('{"a": 1,, "b": 2}', "not_json"),
        ('{"a": [1}', "not_json"),
        ('["not", "an", "object"]', "not_an_object"),
        ('["not", "an", "obj', "not_an_object"),
        ("123", "not_an_object"),
        ('"a string"', "not_an_object"),
        (line(LOGIN) + " junk", "trailing_data"),
        (line(LOGIN) + line(LOGIN)[:-1], "trailing_data"),  # a cut value: the record is not split
        (line(LOGIN) + line({"eventid": "x"}), "trailing_data: value 2 of 2: validation_failed"),
        (line(LOGIN) + "}}", "trailing_data"),
        ('{"a": "nul\x00"}', "nul_byte"),
        (line(LOGIN).replace("root", "ro\x00ot"), "nul_byte"),
        (line(LOGIN).replace("root", "ro\\u0000ot"), "not_storable"),
        (line(LOGIN).replace("root", "\\ud800"), "not_storable"),
        (line({"src_port": 1, **LOGIN}).replace(": 1,", ": 1e999999999,"), "not_storable"),  # would stall
        (line({"src_port": 1, **LOGIN}).replace(": 1,", ": 1e-99999,"), "not_storable"),
        (line({"src_port": 1, **LOGIN}).replace(": 1,", ": 1e9999999999999999999,"), "not_storable"),  # no Decimal
        ("\ud800", "not_text"),
    ],
)
def test_refusals(text: str, reason: str) -> None:
    assert_refused(repair_record(text), reason)


@pytest.mark.parametrize("character", ["\n", "\t", "\r", "\r\n", "\x1b", "\x7f"])
@pytest.mark.parametrize("where", ["message", "password", "username"])
def test_raw_control_characters_in_strings_are_kept_as_data(character: str, where: str) -> None:
    value = LOGIN[where]
    event = {**LOGIN, where: value[:2] + character + value[2:]}
    written = line(event).replace(json.dumps(event[where], ensure_ascii=False), f'"{event[where]}"')
    assert character in written  # unescaped, as a careless writer writes it
    assert_repaired(repair_record(written), "control_characters" if character != "\x7f" else "as_is", event)
    # with another fault the tokenizer fixes, the character is still the writer's
    assert_repaired(repair_record(written[:-1] + ",}"), "tokenizer_fix", event)
    assert_repaired(repair_record(written[:-1]), "truncation_closed", event)


def test_a_truncation_closed_is_named_and_never_passes_for_whole() -> None:
    result = repair_record(line(LOGIN)[:-1])
    assert (result.strategy, result.event) == ("truncation_closed", jsonutil.loads(line(LOGIN)))
    assert repair_record(line(LOGIN)).strategy == "as_is"


@pytest.mark.parametrize("between", ["", " ", "\t", "  \t "])
def test_values_written_on_one_line_are_split_each_at_its_byte_offset(between: str) -> None:
    second = {**LOGIN, "username": "пароль", "message": "login attempt [пароль/admin] failed"}
    third = {**LOGIN, "password": "x"}
    text = line(LOGIN) + between + line(second) + between + line(third)[:-1] + ",}"  # a trailing comma in one
    result = repair_record(text.encode())
    parts = [result, *result.more]
    assert [p.strategy for p in parts] == ["split"] * 3 and result.reason is None
    assert [p.event for p in parts] == [LOGIN, second, third]
    encoded = text.encode()
    assert [p.at for p in parts] == [0, encoded.index(b'{"eventid"', 1), encoded.rindex(b'{"eventid"')]


def test_a_byte_order_mark_before_a_record_is_skipped_and_the_event_starts_after_it() -> None:
    result = repair_record("\ufeff" + line(LOGIN))
    assert (result.strategy, result.at, result.event) == ("bom_skipped", 3, LOGIN)
    result = repair_record("\ufeff" + line(LOGIN) + line(LOGIN))
    assert [(p.strategy, p.at) for p in (result, *result.more)] == [("split", 3), ("split", 3 + len(line(LOGIN)))]
    assert repair_record("\ufeff" + line(LOGIN)[:-1]).strategy == "truncation_closed"


def test_a_python_literal_dict_is_read_without_evaluating_it() -> None:
    event = {
        **LOGIN,
        "eventid": "cowrie.session.file_download",
        "url": "http://198.51.100.7/x",
        "outfile": "var/lib/cowrie/downloads/" + "a" * 64,
        "shasum": "a" * 64,
        "duplicate": True,
        "destfile": None,
        "sizes": [1, -2, 3.5, 1.1534101963043213, 1e-05],
        "message": 'it\'s "quoted" \\ é ✓ \x1b',
    }
    result = repair_record(repr(event))
    assert (result.strategy, result.reason) == ("python_literal", None)
    assert result.event["duplicate"] is True and result.event["destfile"] is None
    assert result.event["sizes"] == [1, -2, Decimal("3.5"), Decimal("1.1534101963043213"), Decimal("0.00001")]
    assert {k: v for k, v in result.event.items() if k != "sizes"} == {k: v for k, v in event.items() if k != "sizes"}
    assert jsonutil.loads(result.text) == result.event  # the text handed to jsonb is JSON
    # Python's repr of a dict with no Cowrie event in it is refused by the catalogue, not read as a JSON fault.
    assert_refused(repair_record("{'key': 'value'}"), "validation_failed")
    assert_refused(repair_record("{'a': __import__('os').system('true')}"), "not_json")  # never evaluated
    assert_refused(repair_record(repr({**LOGIN, "x": "\x00"})), "not_json")  # jsonb holds no NUL


def test_bytes_that_are_not_utf8_and_inputs_that_are_not_text_are_refused() -> None:
    assert_refused(repair_record(line(LOGIN).encode()[:-2] + b'\xff"}'), "not_text")
    assert_refused(repair_record(b"\x00"), "nul_byte")
    for thing in (None, 123, ["x"], {"eventid": "cowrie.login.failed"}):
        assert_refused(repair_record(thing), "not_text")  # type: ignore[arg-type]


def test_too_large_is_refused_before_any_work() -> None:
    big = line({**LOGIN, "input": "x" * MAX_INPUT_BYTES})
    started = time.perf_counter()
    assert_refused(repair_record(big), "too_large")
    assert_refused(repair_record(big.encode()), "too_large")
    assert_refused(repair_record("é" * (MAX_INPUT_BYTES // 2 + 1)), "too_large")  # counted in UTF-8 bytes
    assert time.perf_counter() - started < 0.5
    assert repair_record(line({**LOGIN, "input": "x" * (MAX_INPUT_BYTES - 400)})).strategy == "as_is"


def test_deep_nesting_is_refused() -> None:
    assert_refused(repair_record('{"a": ' + "[" * 100_000), "too_deeply_nested")
    assert_refused(repair_record('{"a": ' + "[" * 5_000 + "]" * 5_000 + "}"), "too_deeply_nested")
    assert_refused(repair_record('{"a": ' + "[" * 5_000 + "]" * 5_000 + ",}"), "too_deeply_nested")
    assert_refused(repair_record("[" * 100_000), "too_deeply_nested")
    nested = line(LOGIN)[:-1] + ', "x": ' + "[" * 600 + "]" * 600 + "}"  # valid JSON, but past the reader's bound
    assert_refused(repair_record(nested), "too_deeply_nested")


def test_a_refusal_reason_stays_short() -> None:
    result = repair_record(line({**LOGIN, "src_ip": "x" * 100_000}))
    assert result.reason is not None and result.reason.startswith("validation_failed: invalid_src_ip: xxx")
    assert len(result.reason) <= 1000


@pytest.mark.parametrize(
    "text",
    [
        '{"a": "' + "\\" * (MAX_INPUT_BYTES - 10),
        '{"a": "' + "\\q" * (MAX_INPUT_BYTES // 2 - 10),
        '{"a": [' + "1," * (MAX_INPUT_BYTES // 2 - 10),
        '{"a": [' + '"x",' * (MAX_INPUT_BYTES // 4 - 10),
        '{"a": ' * (MAX_INPUT_BYTES // 6),
        "{" + '"k": 1, ' * (MAX_INPUT_BYTES // 8 - 2) + '"z": true',
        '{"a": ' + "[" * 400 + "1," * (MAX_INPUT_BYTES // 2 - 500),
        "{" * MAX_INPUT_BYTES,
        '"' * MAX_INPUT_BYTES,
    ],
)
def test_every_pass_is_linear(text: str) -> None:
    started = time.perf_counter()
    result = repair_record(text)
    assert result.event is None
    assert time.perf_counter() - started < 3.0, result.reason


# --- the closing policy -------------------------------------------------------------------------------------


def test_closing_policy_a_record_that_lost_a_whole_trailing_pair_other_than_session() -> None:
    """Closing is safe only where the cut cannot have taken whole pairs, i.e. where Cowrie's output layer's
    last attributes (sensor, timestamp, src_ip, session) are all there; otherwise the repair is refused."""
    # 2018 layout: a cut right after the session value lost `, "sensor": "honeypot-ssh"`. The JSON closes fine
    # and the event would even validate: refusing it is the policy, not the catalogue.
    lost_sensor = LOGIN_2018[: LOGIN_2018.index(', "sensor"')]
    fixed, reason = tokenizer_fix(lost_sensor)
    assert reason is None and validate_event(jsonutil.loads(fixed)).valid
    assert_refused(repair_record(lost_sensor), "unclosed: lacks sensor")
    # The same record that lost only its closing brace holds all four and is repaired.
    assert_repaired(repair_record(LOGIN_2018[:-1]), "truncation_closed", json.loads(LOGIN_2018))
    # Current layout: a cut that lost any whole pair lost session, so catalogue validation refuses it anyway.
    text = line(LOGIN)
    lost_session = text[: text.index(', "session"')]
    assert_refused(repair_record(lost_session), "validation_failed: missing_session")
    assert_repaired(repair_record(text[:-1]), "truncation_closed", LOGIN)
    # A layout with session first: losing src_ip would validate, but the record lacks src_ip: refused.
    session_first = line({"session": LOGIN["session"], **{k: v for k, v in LOGIN.items() if k != "session"}})
    assert_refused(repair_record(session_first[: session_first.index(', "src_ip"')]), "unclosed: lacks src_ip")


@pytest.mark.parametrize("layout", ["cowrie", "session_first", "sensor_last"])
def test_every_prefix_of_a_record_is_refused_or_exact(layout: str) -> None:
    """Cut every event at every byte: the only repair allowed is the original itself (cut before ``}``)."""
    wrong_without_policy = 0
    for event in generate_events(60, seed=7):
        if layout == "session_first":
            event = {"session": event["session"], **event}
        elif layout == "sensor_last":
            event = {**{k: v for k, v in event.items() if k != "sensor"}, "sensor": event["sensor"]}
        text, original = line(event), canonical(jsonutil.loads(line(event)))
        for cut in range(1, len(text)):
            result = repair_record(text[:cut])
            assert result.event is None or (cut == len(text) - 1 and canonical(result.event) == original), cut
            fixed, _ = tokenizer_fix(text[:cut])  # what closing alone, with no policy, would have promoted
            if fixed is not None and cut < len(text) - 1 and validate_event(jsonutil.loads(fixed)).valid:
                wrong_without_policy += 1
    # In Cowrie's layout the catalogue alone keeps closing safe (session is last); elsewhere it takes the policy.
    assert (wrong_without_policy == 0) == (layout == "cowrie")


# --- stitching ------------------------------------------------------------------------------------------------


def fragments_of(text: str, newline: str = "\n", strip: bool = False) -> list[Fragment]:
    """Dead letters a line-based reader makes of ``text``: one per line at its byte offset (``strip``: blanks
    around each line dropped, as this project's reader drops them around records)."""
    out, offset = [], 0
    for i, part in enumerate(text.split(newline)):
        raw = part.encode()
        lead = len(raw) - len(raw.lstrip(b" \t")) if strip else 0
        if raw.strip():
            out.append(Fragment(f"dl{i}", offset + lead, raw[lead:].rstrip(b" \t") if strip else raw))
        offset += len(raw) + len(newline.encode())
    return out


KEX = {
    "eventid": "cowrie.client.kex",
    "hassh": "f555226df1963d1d3c09daf865abdc9a",
    "kexAlgs": ["curve25519-sha256", "ecdh-sha2-nistp256"],
    "langCS": [""],
    "message": "SSH client hassh fingerprint",
    "sensor": "hp1",
    "timestamp": "2024-01-15T10:30:00.123456Z",
    "src_ip": "203.0.113.10",
    "session": "3f2a9c0b1d4e",
}


def test_stitch_a_pretty_printed_event_keeps_the_newlines() -> None:
    fragments = fragments_of(json.dumps(KEX, indent=2))
    assert len(fragments) == 16
    [stitched] = stitch_fragments(fragments[::-1])  # any order in
    assert stitched.keys == tuple(f.key for f in fragments) and stitched.strategy == "stitch"
    assert canonical(stitched.event) == canonical(jsonutil.loads(line(KEX)))


def test_stitch_a_split_string_keeps_the_writers_newline() -> None:
    text = line(LOGIN)
    at = text.index("attempt") + 3
    written = text[:at] + "\n" + text[at:]
    fragments = fragments_of(written)
    assert [repair_record(f.raw).reason for f in fragments] == ["truncated_value", "not_json"]
    [stitched] = stitch_fragments(fragments)
    assert stitched.event["message"] == "login att\nempt [root/admin] failed"
    assert stitched.event == jsonutil.loads(written, control_characters=True)
    # A newline right after a backslash: "\" + newline is no escape, and dropping the newline would change the
    # value: refused.
    quoted = {**LOGIN, "eventid": "cowrie.command.input", "input": 'echo "hi"'}
    text = line(quoted)
    at = text.index('\\"hi') + 1
    assert stitch_fragments(fragments_of(text[:at] + "\n" + text[at:])) == []


def test_stitch_mixed_pretty_and_split_and_crlf() -> None:
    pretty = json.dumps(KEX, indent=2)
    at = pretty.index("fingerprint")
    [stitched] = stitch_fragments(fragments_of(pretty[:at] + "\n" + pretty[at:]))
    assert stitched.event["message"] == KEX["message"].replace("fingerprint", "\nfingerprint")
    [stitched] = stitch_fragments(fragments_of(pretty.replace("\n", "\r\n"), "\r\n"))
    assert stitched.event == jsonutil.loads(line(KEX))
    # In a string, a two-byte gap may have been "\r\n" or a blank the reader stripped before "\n": refused.
    crlf = pretty.replace("\n", "\r\n")
    at = crlf.index("fingerprint")
    assert stitch_fragments(fragments_of(crlf[:at] + "\r\n" + crlf[at:], "\r\n")) == []
    text = line(LOGIN)
    at = text.index("attempt") + 8
    assert text[at - 1] == " "
    assert stitch_fragments(fragments_of(text[:at] + "\n" + text[at:], strip=True)) == []  # lost blank before "\n"
    at = text.index("attempt") + 3
    assert len(stitch_fragments(fragments_of(text[:at] + "\n" + text[at:], strip=True))) == 1


def test_stitch_refuses_what_it_cannot_prove() -> None:
    pretty = json.dumps(KEX, indent=2)
    fragments = fragments_of(pretty)
    assert stitch_fragments(fragments[:-1]) == []  # the closing brace is missing: never closed for a group
    gap = [*fragments[:5], *(Fragment(f.key, f.offset + 2, f.raw) for f in fragments[5:])]
    assert stitch_fragments(gap) == []  # not contiguous
    assert stitch_fragments(fragments[1:]) == []  # no fragment starting with "{"
    junk = [*fragments[:3], Fragment("junk", fragments[3].offset, b"\xff" * len(fragments[3].raw)), *fragments[4:]]
    assert stitch_fragments(junk) == []
    nul = [*fragments[:3], Fragment("nul", fragments[3].offset, b"\x00" * len(fragments[3].raw)), *fragments[4:]]
    assert stitch_fragments(nul) == []
    no_session = {k: v for k, v in KEX.items() if k != "session"}
    assert stitch_fragments(fragments_of(json.dumps(no_session, indent=2))) == []  # the catalogue still rules
    trailing = fragments_of(json.dumps(KEX, indent=2).replace('"hp1"', '"hp1",').replace('"langCS"', '"langCS",'))
    assert stitch_fragments(trailing) == []  # a comma where a value is missing is no trailing comma
    fixed = fragments_of(
        json.dumps(KEX, indent=2).replace('  "session": "3f2a9c0b1d4e"\n', '  "session": "3f2a9c0b1d4e",\n')
    )
    assert [s.event for s in stitch_fragments(fixed)] == [jsonutil.loads(line(KEX))]  # a trailing comma is dropped


def test_stitch_several_events_each_fragment_once_shortest_first() -> None:
    first, second = json.dumps(KEX, indent=2), json.dumps({**KEX, "session": "00000000aaaa"}, indent=2)
    fragments = fragments_of(first + "\n" + second)
    stitched = stitch_fragments(fragments)
    assert [s.event["session"] for s in stitched] == ["3f2a9c0b1d4e", "00000000aaaa"]
    assert sorted(k for s in stitched for k in s.keys) == sorted(f.key for f in fragments)


def test_stitch_bounds_the_group_length() -> None:
    many = {**KEX, "kexAlgs": [f"alg{i}" for i in range(MAX_GROUP)]}
    assert stitch_fragments(fragments_of(json.dumps(many, indent=2))) == []
    fits = {**KEX, "kexAlgs": [f"alg{i}" for i in range(MAX_GROUP - 20)]}
    assert len(stitch_fragments(fragments_of(json.dumps(fits, indent=2)))) == 1


def test_stitch_many_fragments_is_linear() -> None:
    fragments = fragments_of("\n".join(["{", '"a": [', *['"x",'] * 50_000]))
    started = time.perf_counter()
    assert stitch_fragments(fragments) == []
    assert time.perf_counter() - started < 5.0


# --- stored payloads ------------------------------------------------------------------------------------------


def test_raw_bytes_of_every_payload_form() -> None:
    value = jsonutil.loads(line(LOGIN))
    assert raw_bytes_of(value, "json") == canonical(value).encode()
    assert raw_bytes_of({"raw_text": '{"a": é'}, "raw_text") == '{"a": é'.encode()
    assert raw_bytes_of({"raw_base64": "/wB7"}, "raw_base64") == b"\xff\x00{"
    assert raw_bytes_of({"raw_text": "x"}, None) == b"x"
    assert raw_bytes_of({"raw_base64": "/wB7"}, None) == b"\xff\x00{"
    assert raw_bytes_of({"raw_text": "x", "other": 1}, None) == canonical({"raw_text": "x", "other": 1}).encode()
    assert raw_bytes_of(["a", Decimal("1.50")], None) == b'["a", 1.50]'
    with pytest.raises(ValueError):
        raw_bytes_of({"raw_text": "x"}, "xml")
    assert repair_record(raw_bytes_of(value, "json")).event == value


# --- the reference cases --------------------------------------------------------------------------------------

CASES: list[dict[str, Any]] = [json.loads(text) for text in _DATA.read_text(encoding="utf-8").splitlines() if text]
THRESHOLD_KINDS = ("repair_event", "validate_event")
THRESHOLD = 0.95

# Where a case's expectation conflicts with Cowrie's catalogue, the catalogue wins: the case is scored against the
# outcome the catalogue gives (no event promoted; only required attributes reported missing).
_NO_HEX_SESSION = "session {!r} is not a Cowrie session id (12 or 8 hex): the catalogue rejects the event"
CATALOGUE_WINS: dict[str, str] = {
    "dlqproc-repair-unclosed-brace-command": "cowrie.command.input carries `input`, not `command`",
    "dlqproc-process-valid-command-row": "cowrie.command.input carries `input`, not `command`",
    "dlqproc-process-login-missing-user-pass": "a login without username; the anchor filled 'unknown' (fabricated)",
    **{f"dlqproc-process-limit-{i}": _NO_HEX_SESSION.format(f"session{i}") for i in range(5)},
    "debug-kex-fragment-with-eventid": "a mid-object fragment has no session or timestamp; the anchor invented them",
    "validator-missing_required_fields": "password is documented only for password/keyboard-interactive logins",
    "hybrid-single-line": _NO_HEX_SESSION.format("abc123"),
    "hybrid-multiline-object": "no timestamp, and " + _NO_HEX_SESSION.format("abc123"),
    "hybrid-mixed": "no timestamps, and " + _NO_HEX_SESSION.format("abc123"),
    "hybrid-empty-lines": "no timestamp, and " + _NO_HEX_SESSION.format("abc123"),
    "hybrid-buffer-interrupted": "no timestamp, and " + _NO_HEX_SESSION.format("abc123"),
    "hybrid-stats-mix": "no timestamps, and " + _NO_HEX_SESSION.format("abc123"),
    "doc-mixed-single-multiline": "neither event has a timestamp",
}
# Where a case wants a value made up from a cut or altered input, this module's rules win: it is refused.
POLICY_WINS: dict[str, str] = {
    "derived-truncated-value": "ends inside a string: a cut command is never presented (reason truncated_value)",
    "doc-unclosed-string": "ends inside a string: 203.0.113.10 may be the start of 203.0.113.104",
    "derived-real-login-failed-unclosed": "unclosed without sensor: closing could drop pairs the cut took",
    "repairstrat-fix_unclosed_strings-35": "ends inside a string: the value was cut",
    "repairstrat-fix_unclosed_braces-37": "ends after a bare number: 3 may be the start of 35",
    "repairstrat-repair_json-41": "ends after a comma: a pair was cut",
    "unicode-raw-control-chars": "deleting characters changes a value",
    "unicode-real-world-ssh-version": "dropping \\u0000 changes a value (ingest keeps the original beside it)",
    "unicode-backfill-nul-filename": "dropping \\u0000 changes a value (ingest keeps the original beside it)",
}
_POLICY_REASONS = ("truncated_value", "unclosed", "control_character", "nul_byte", "not_storable")
# The case's notes say to strip the doc's "// Missing closing brace" annotation before testing.
INPUT_FIXUPS: dict[str, Callable[[str], str]] = {
    "doc-unclosed-brace-with-comment": lambda text: re.sub(r"\n\s*//[^\n]*", "", text),
}
# Reasons the cases give, as this module words them.
_REASONS = {
    "top-level JSON is not an object": "not_an_object",
    "not a Cowrie event (no eventid)": "missing_eventid",
    "eventid not in Cowrie catalogue": "unknown_eventid",
}


def _input(case: dict[str, Any]) -> Any:
    return INPUT_FIXUPS.get(case["id"], lambda text: text)(case["input"])


def _event(case: dict[str, Any]) -> Any:
    return case["input"] if isinstance(case["input"], dict) else jsonutil.loads(case["input"])


def _stream_events(lines: list[str]) -> list[dict[str, Any]]:
    """What the DLQ makes of a line-split stream: lines that repair alone, then stitched runs of the rest."""
    events, fragments, offset = [], [], 0
    for index, text in enumerate(lines):
        raw = text.encode()
        if text.strip():
            result = repair_record(raw)
            if result.event is not None:
                events.append(result.event)
            else:
                fragments.append(Fragment(index, offset, raw))
        offset += len(raw) + 1
    return events + [s.event for s in stitch_fragments(fragments)]


def _claimed_events(case: dict[str, Any]) -> list[dict[str, Any]]:
    """The events a case would have promoted (its own, or the anchor's where it only gives counts)."""
    expected = case["expected"]
    if case["kind"] == "stream":
        if isinstance(expected.get("events"), list):
            return [e["event"] for e in expected["events"]]
        return [r["event"] for r in (case.get("anchor_actual") or {}).get("results", []) if not r["dlq"]]
    if "event" in expected:
        return [expected["event"]]
    fixed, _ = tokenizer_fix(_input(case))
    if fixed is not None:
        return [jsonutil.loads(fixed)]
    return [expected["event_subset"]] if "event_subset" in expected else []


def _not_required(value: dict[str, Any], error: str) -> bool:
    name = error.removeprefix("missing_required_field: ")
    return name != error and name not in REQUIRED_ATTRIBUTES.get(value.get("eventid"), ())


def _catalogue_conflict(case: dict[str, Any]) -> bool:
    """The expectation contradicts the catalogue: it promotes an event validate_event rejects, or it requires an
    attribute the catalogue documents as conditional."""
    if case["kind"] == "validate_event":
        value = _event(case)
        docs = {n: a["doc"] for a in _CATALOGUE["eventids"][value["eventid"]]["attributes"] for n in a["names"]}
        return any(
            _not_required(value, error) and "(" in docs[error.split(": ")[1]]
            for error in case["expected"].get("errors_include", [])
        )
    return any(not validate_event(event).valid for event in _claimed_events(case))


def _policy_conflict(case: dict[str, Any]) -> bool:
    """The expectation wants something produced, and this module refuses it for one of its stated rules."""
    wants = {"event", "event_subset", "json", "output", "output_endswith", "parsed_subset", "parses", "recommended"}
    wants |= {"recommended_output"}
    if case["kind"] == "json_repair_strategy":
        reason = tokenizer_fix(case["input"])[1]
    else:
        reason = repair_record(_input(case)).reason
    return bool(wants & set(case["expected"])) and (reason or "").startswith(_POLICY_REASONS)


def _score_repair_event(case: dict[str, Any], overridden: bool) -> bool:
    result, expected = repair_record(_input(case)), case["expected"]
    if overridden:
        return result.event is None
    recommended = expected["recommended"] if isinstance(expected.get("recommended"), dict) else {}
    outcome = expected.get("outcome") or recommended.get("outcome") or "incomplete"
    if outcome in ("repaired", "valid_unchanged"):
        if result.event is None:
            return False
        if outcome == "valid_unchanged":
            return canonical(result.event) == canonical(jsonutil.loads(case["input"]))
        want = expected.get("event") or expected.get("event_subset") or {}
        return all(result.event.get(k) == v for k, v in want.items())
    if outcome == "split":  # one event per value, each at its own offset
        events = [result.event, *(part.event for part in result.more)] if result.event is not None else []
        wanted = expected["events"]
        return len(events) == len(wanted) and all(
            part is not None and all(part.get(k) == v for k, v in want.items())
            for part, want in zip(events, wanted, strict=True)
        )
    if result.event is not None or result.reason is None:  # every other outcome: nothing promoted
        return False
    if _REASONS.get(expected.get("reason"), "") not in result.reason:
        return False
    missing = expected.get("missing") or recommended.get("missing") or []
    return all(f"missing_{m}" in result.reason for m in missing if m in ("eventid", "timestamp", "session"))


def _score_validate_event(case: dict[str, Any], overridden: bool) -> bool:
    value = _event(case)
    result, expected = validate_event(value), dict(case["expected"])
    if overridden:
        expected["errors_include"] = [e for e in expected.get("errors_include", []) if not _not_required(value, e)]
    return (
        expected.get("valid", result.valid) == result.valid
        and all(e in result.errors for e in expected.get("errors_include", []))
        and all(any(e.startswith(p) for e in result.errors) for p in expected.get("errors_include_prefix", []))
        and list(result.errors) == expected.get("errors", list(result.errors))
    )


def _score_stream(case: dict[str, Any], overridden: bool) -> bool:
    claimed = _claimed_events(case)
    if overridden:
        claimed = [event for event in claimed if validate_event(event).valid]
    return sorted(map(canonical, _stream_events(case["input"]))) == sorted(map(canonical, claimed))


def _score_json_repair_strategy(case: dict[str, Any], overridden: bool) -> bool:
    fixed, _ = tokenizer_fix(case["input"])
    if overridden or fixed is None:
        return overridden and fixed is None
    expected = case["expected"]
    if "recommended_output" in expected:
        return jsonutil.loads(fixed) == jsonutil.loads(expected["recommended_output"])
    return (
        fixed == expected.get("output", fixed)
        and fixed.endswith(expected.get("output_endswith", ""))
        and fixed.startswith(expected.get("output_startswith", ""))
    )


def _score_sanitize_json(case: dict[str, Any], overridden: bool) -> bool:
    result = repair_record(case["input"])
    return overridden and result.reason == "not_storable"


SCORERS: dict[str, Callable[[dict[str, Any], bool], bool]] = {
    "repair_event": _score_repair_event,
    "validate_event": _score_validate_event,
    "stream": _score_stream,
    "json_repair_strategy": _score_json_repair_strategy,
    "sanitize_json": _score_sanitize_json,
}


def _score_table() -> tuple[dict[str, float], list[str], list[str]]:
    rows: dict[str, Counter[str]] = {}
    failed = []
    for case in CASES:
        row = rows.setdefault(case["kind"], Counter())
        row["cases"] += 1
        if case["kind"] not in SCORERS:
            continue
        catalogue, policy = case["id"] in CATALOGUE_WINS, case["id"] in POLICY_WINS
        row["scored"] += 1
        row["catalogue_wins"] += catalogue
        row["policy_wins"] += policy
        if SCORERS[case["kind"]](case, catalogue or policy):
            row["passed"] += 1
        else:
            failed.append(f"{case['kind']}: {case['id']}")
    rates = {kind: row["passed"] / row["scored"] for kind, row in rows.items() if row["scored"]}
    lines = [f"{'kind':<22}{'cases':>6}{'scored':>7}{'passed':>7}{'catalogue':>10}{'policy':>7}   rate"]
    for kind, row in sorted(rows.items(), key=lambda item: (-item[1]["scored"], item[0])):
        rate = f"{rates[kind]:6.1%}" if kind in rates else "   n/a (not this module's API)"
        lines.append(
            f"{kind:<22}{row['cases']:>6}{row['scored']:>7}{row['passed']:>7}{row['catalogue_wins']:>10}"
            f"{row['policy_wins']:>7}   {rate}"
        )
    return rates, lines, failed


def test_overrides_really_conflict() -> None:
    """Each listed case conflicts for the stated reason, so neither list can rot into a way of hiding failures."""
    by_id = {case["id"]: case for case in CASES}
    assert set(CATALOGUE_WINS) <= set(by_id) and set(POLICY_WINS) <= set(by_id)
    assert not set(CATALOGUE_WINS) & set(POLICY_WINS)
    assert [i for i in CATALOGUE_WINS if not _catalogue_conflict(by_id[i])] == []
    assert [i for i in POLICY_WINS if not _policy_conflict(by_id[i])] == []


def test_what_the_anchor_fabricated_is_refused() -> None:
    """Cases where the anchor fills in values pass only because the repair refuses to do the same."""
    filled = re.compile(r'"(username|password|session|timestamp)": "(unknown|unknown-session|<now>)"')
    anchors = {c["id"]: json.dumps({k: v for k, v in c.items() if "anchor" in k}) for c in CASES}
    fabricated = [c for c in CASES if c["kind"] == "repair_event" and filled.search(anchors[c["id"]])]
    assert len(fabricated) == 5
    assert [c["id"] for c in fabricated if repair_record(_input(c)).event is not None] == []


def test_reference_cases_score(capsys: pytest.CaptureFixture[str]) -> None:
    rates, lines, failed = _score_table()
    report = "\n".join(["reference cases, per kind:", *lines, "failed: " + (", ".join(failed) or "none")])
    with capsys.disabled():
        print("\n" + report)
    for kind in THRESHOLD_KINDS:
        assert rates[kind] >= THRESHOLD, report


# --- ground truth: the generated corpus -----------------------------------------------------------------------

SEEDS = (0, 1, 2, 3, 4)
# Measured: 0 misses of 1767 recoverable dead letters over these seeds. The threshold sits below the smallest
# share one strategy carries (truncated-before-"}" records, ~7% of the recoverable ones), so losing any
# strategy fails here, while a new generator kind the strategies do not cover yet does not at once.
MAX_MISS_RATE = 0.05


def _corpus_counts(tmp_path: Path, seed: int) -> Counter[str]:
    path = tmp_path / f"cowrie-{seed}.json"
    truth = write_corrupted_log(path, n_events=3000, seed=seed)
    starts = [t.offset for t in truth]
    with path.open("rb") as stream:
        records = list(read_records(stream))

    def owner(offset: int) -> int:
        return bisect.bisect_right(starts, offset) - 1

    repaired: dict[int, list[dict[str, Any]]] = {}
    dead: set[int] = set()
    fragments = []
    for index, record in enumerate(records):
        if record.ok and validate_event(record.value).valid:
            continue
        dead.add(owner(record.offset))
        result = repair_record(record.raw)
        if result.event is not None:
            repaired.setdefault(owner(record.offset), []).append(result.event)
        else:
            fragments.append(Fragment(index, record.offset, record.raw))
    for stitched in stitch_fragments(fragments):
        owners = {owner(records[k].offset) for k in stitched.keys}
        event = stitched.event if len(owners) == 1 else {"stitched across records": sorted(owners)}
        repaired.setdefault(min(owners), []).append(event)

    counts: Counter[str] = Counter()
    for t in dead:
        events, record = repaired.get(t, []), truth[t]
        if events:
            right = all(canonical(e) == canonical(record.original) for e in events)
            counts["correct" if right else "wrong"] += 1
            counts[f"correct:{record.corruption}" if right else f"wrong:{record.corruption}"] += 1
        else:
            counts["miss" if record.recoverable else "unrecoverable"] += 1
        counts["recoverable"] += record.recoverable
    return counts


def test_no_wrong_repairs_on_generated_corpora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    total: Counter[str] = Counter()
    for seed in SEEDS:
        total.update(_corpus_counts(tmp_path, seed))
    miss_rate = total["miss"] / total["recoverable"]
    report = (
        f"corpus, seeds {SEEDS}, 3000 events each: correct={total['correct']} wrong={total['wrong']} "
        f"misses={total['miss']} unrecoverable={total['unrecoverable']} recoverable={total['recoverable']} "
        f"miss rate={miss_rate:.2%}\n  by kind: " + ", ".join(f"{k}={v}" for k, v in sorted(total.items()) if ":" in k)
    )
    with capsys.disabled():
        print("\n" + report)
    assert total["wrong"] == 0, report
    assert miss_rate <= MAX_MISS_RATE, report
    for kind in ("trailing_comma", "bad_escape", "split_line", "truncated"):
        assert total[f"correct:{kind}"] > 0, report


# --- property: never raises, never invents ----------------------------------------------------------------------

_BACKSLASHES = (r'echo -e "\x6F\x6B"', r"dir C:\Users\Public", r"grep -E '^\S+\s+\d+' /var/log/auth.log")
_BASES = [
    *(line(e) for e in generate_events(60, seed=11)),
    *(json.dumps(e, indent=2) for e in generate_events(5)),
    *(line({**LOGIN, "eventid": "cowrie.command.input", "input": command}) for command in _BACKSLASHES),
]
_STRING_LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPE = re.compile(r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])|\\')
_NUMBER_TOKEN = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _decoded_strings(text: str) -> set[str]:
    """Every string literal of ``text``, decoded with stray backslashes read as literal backslashes."""
    found = set()
    for match in _STRING_LITERAL.finditer(text):
        body = _ESCAPE.sub(lambda m: m.group() if m.group(1) else "\\\\", match.group(1))
        with contextlib.suppress(ValueError):
            found.add(json.loads(f'"{body}"', strict=False))  # raw control characters are the writer's data
    return found


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


@st.composite
def _damaged(draw: st.DrawFn) -> str:
    """A real event line (or pretty-printed one) with up to three blind or targeted injuries."""
    text = draw(st.sampled_from(_BASES))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        closers = [i for i, c in enumerate(text) if c in "}]"]
        escaped = [m.start() for m in re.finditer(r"\\\\", text)]
        op = draw(st.sampled_from(("cut", "tail", "insert", "delete", "junk", "comma", "unescape")))
        if op == "cut":
            text = text[:at]
        elif op == "tail":
            text = text[: -draw(st.integers(1, 3))]
        elif op == "insert":
            text = (
                text[:at] + draw(st.sampled_from((",", "\\", '"', "}", "]", "{", "\n", " ", ":", "\\u12"))) + text[at:]
            )
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)) :]
        elif op == "junk":
            text = text[:at] + draw(st.text(max_size=6)) + text[at:]
        elif op == "comma" and closers:
            at = draw(st.sampled_from(closers))
            text = text[:at] + "," + text[at:]
        elif op == "unescape" and escaped:
            at = draw(st.sampled_from(escaped))
            text = text[:at] + text[at + 1 :]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_damaged(), st.text(max_size=300), st.binary(max_size=300)))
def test_repair_never_raises_and_never_invents(raw: str | bytes) -> None:
    started = time.perf_counter()
    result = repair_record(raw)
    assert time.perf_counter() - started < 2.0
    if result.event is None:
        assert result.strategy is None and isinstance(result.reason, str) and result.reason
        return
    assert result.strategy in set(STRATEGIES) - {"stitch"} and result.reason is None
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    strings = _decoded_strings(text)
    numbers = {Decimal(token) for token in _NUMBER_TOKEN.findall(text)}
    for part in (result, *result.more):
        assert part.event is not None and validate_event(part.event).valid
        for leaf in _leaves(part.event):
            if isinstance(leaf, str):
                assert leaf in strings, leaf
            elif isinstance(leaf, Decimal):
                assert leaf in numbers, leaf


def _the_tokenizer_alone(raw: str | bytes) -> RepairResult:
    with (
        mock.patch.object(repair, "_quick_fix", lambda *args: None),
        mock.patch.object(repair, "_speculative_fix", lambda *args: None),
        mock.patch.object(repair, "_cut_in_a_string", lambda *args: False),
    ):
        return repair_record(raw)


def _same(raw: str | bytes) -> None:
    quick, slow = repair_record(raw), _the_tokenizer_alone(raw)
    assert (quick.strategy, quick.reason) == (slow.strategy, slow.reason), raw
    assert quick.event is None or canonical(quick.event) == canonical(slow.event), raw


@pytest.mark.parametrize(
    "text",
    [
        line(LOGIN)[:-1] + ",}",
        line(LOGIN)[:-1] + " ,\n }",
        line(LOGIN)[:-1],
        line(LOGIN)[:-1] + "\n",
        line({**LOGIN, "kexAlgs": ["a", "b"]}).replace('"b"]', '"b",]')[:-1] + ",",
        line({**LOGIN, "kexAlgs": ["a", "b"]}).replace('"b"]', '"b",]')[:-1],
        line({**LOGIN, "width": 80})[:-1].replace('"session": "3f2a9c0b1d4e"', '"session": "3f2a9c0b1d4e", "n": 5'),
        line({**LOGIN, "kexAlgs": ["a"]})[:-1].replace(
            '"session": "3f2a9c0b1d4e"', '"session": "3f2a9c0b1d4e", "k": ["a"'
        ),
        line(LOGIN)[:-1] + ",}}",
        line(LOGIN)[:-1] + ",,}",
        "{",
        "{,}",
        "{ ,\n}",
        "[,]",
        line(LOGIN)[:-1] + ', "k": {,}}',
        line(LOGIN)[:-1] + ', "k": ",}',  # the comma inside a string: no trailing comma
        line(LOGIN)[:-1] + ', "k": true',
        line(LOGIN)[:-1] + ', "k": nul',
        line(LOGIN)[:-1] + ', "k": 1e5',  # a number may be cut: never closed
        '{"a": }',
        line(LOGIN).replace('"hp1"', '"hp1",,'),
        line(LOGIN)[:-5],  # cut inside a string: the parser's error is the tokenizer's verdict
        line(LOGIN)[:-1] + ', "k": "a\\',  # ... in an escape
        line(LOGIN)[:-1] + ', "k": "\\ud800',
        line(LOGIN)[:-1] + ', "k',  # ... in a key
        line(LOGIN)[:-1] + ', "n": 1e999999999, "k": "a',  # a number no numeric holds comes before
        line(LOGIN)[:-1] + ', "k": "C:\\Users',  # a stray backslash stops the parser first
        line(LOGIN)[:-1] + ', "k": "tab\there',  # ... as does a raw control character
        '["a", "b',  # no object
        '"abc',
        "  \n" + line(LOGIN)[:-5],
        "{" * 511 + '"a": "b',  # nested as deep as the tokenizer takes, and one deeper
        "{" * 512 + '"a": "b',
        '{"a": [' * 300 + '"b',
    ],
)
def test_the_quick_path_gives_what_the_tokenizer_gives(text: str) -> None:
    _same(text)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_damaged())
def test_the_quick_path_agrees_with_the_tokenizer_on_damaged_events(text: str) -> None:
    _same(text)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from((*_BASES, "{}", '{"a": {}}', '{"a": []}')),
    st.integers(0, 12),
    st.text(alphabet=',}]{[" :\n\\e1', max_size=5),
)
def test_the_guessed_fixes_agree_with_the_tokenizer_at_every_ending(base: str, cut: int, tail: str) -> None:
    """The speculative fixes look only at how a text ends: every ending, cut anywhere near the end."""
    text = base.rstrip()
    _same(text[: len(text) - cut] + tail)


def test_the_quick_path_agrees_with_the_tokenizer_on_generated_corpora(tmp_path: Path) -> None:
    log = tmp_path / "cowrie.json"
    write_corrupted_log(log, n_events=1500, seed=8, corruption_rate=0.6)
    for record in read_records(log.open("rb")):
        _same(record.raw)
