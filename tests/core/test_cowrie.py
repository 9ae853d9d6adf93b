"""Tests for the Cowrie event validator: catalogue-driven rules and the shared cowrieprocessor cases."""

from __future__ import annotations

import copy
import json
import random
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dlq_assets
from dlq_assets.core.cowrie import REQUIRED_ATTRIBUTES, ValidationResult, event_ids, is_session_id, validate_event
from tests.conftest import SHARED_REFERENCE, TEST_DATA

PACKAGED_CATALOGUE = Path(dlq_assets.__file__).resolve().parent / "data/cowrie_eventids.json"
SHARED_CASES = SHARED_REFERENCE / "cowrieprocessor_repair_cases.jsonl"
FALLBACK_CASES = TEST_DATA / "cowrieprocessor_repair_cases.jsonl"
CASES_FILE = SHARED_CASES if SHARED_CASES.exists() else FALLBACK_CASES

SESSION = "3f2a9c0b1d4e"
TIMESTAMP = "2024-01-15T10:30:00.123456Z"
SHA = "a" * 64

# Shared cases whose expectation the real catalogue overrules: id -> (expected error we do not emit,
# eventid and attribute the catalogue documents conditionally, why).
CATALOGUE_WINS: dict[str, tuple[str, str, str, str]] = {
    "validator-missing_required_fields": (
        "missing_required_field: password",
        "cowrie.login.success",
        "password",
        "catalogue: password only on password/keyboard-interactive attempts; public-key logins have none",
    ),
}


def _catalogue() -> dict[str, Any]:
    return json.loads(PACKAGED_CATALOGUE.read_text(encoding="utf-8"))


def _docs(eventid: str) -> dict[str, str]:
    return {name: a["doc"] for a in _catalogue()["eventids"][eventid]["attributes"] for name in a["names"]}


def _is_conditional(doc: str) -> bool:
    """A doc that limits when the attribute appears: "(on HTTP errors)", "absent on ...", "for stdin ..."."""
    return re.search(r"\(|\b(absent|when|if|where|for stdin)\b", doc) is not None


def _event(eventid: object, /, **fields: Any) -> dict[str, Any]:
    return {"eventid": eventid, "timestamp": TIMESTAMP, "session": SESSION, **fields}


def _load_cases() -> list[dict[str, Any]]:
    lines = CASES_FILE.read_text(encoding="utf-8").splitlines()
    return [c for c in map(json.loads, filter(None, lines)) if c["kind"] == "validate_event"]


VALIDATE_CASES = _load_cases()


# --- catalogue -------------------------------------------------------------------------------------------


def test_event_ids_are_the_catalogue_ids() -> None:
    ids = event_ids()
    assert isinstance(ids, frozenset)
    assert len(ids) == 48
    assert ids == set(_catalogue()["eventids"])
    assert {"cowrie.session.params", "cowrie.client.size", "cowrie.command.input"} <= ids
    assert not {"cowrie.system.info", "cowrie.session.command"} & ids


def test_catalogue_is_not_loaded_at_import() -> None:
    code = "import dlq_assets.core.cowrie as c; print(c._catalogue.cache_info().currsize)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"


def test_packaged_catalogue_matches_shared() -> None:
    packaged = _catalogue()
    assert len(packaged["eventids"]) == 48
    shared = SHARED_REFERENCE / "cowrie_eventids.json"
    if shared.exists():
        assert packaged == json.loads(shared.read_text(encoding="utf-8"))


def test_fallback_cases_match_shared() -> None:
    assert FALLBACK_CASES.exists()
    if SHARED_CASES.exists():
        assert FALLBACK_CASES.read_bytes() == SHARED_CASES.read_bytes()


def test_required_table_is_unconditional_in_catalogue() -> None:
    for eventid, names in REQUIRED_ATTRIBUTES.items():
        docs = _docs(eventid)
        for name in names:
            assert name in docs, (eventid, name)
            assert not _is_conditional(docs[name]), (eventid, name, docs[name])


@pytest.mark.parametrize(
    ("eventid", "name"),
    [
        ("cowrie.login.success", "password"),
        ("cowrie.login.failed", "password"),
        ("cowrie.login.failed", "fingerprint"),
        ("cowrie.command.input", "realm"),
        ("cowrie.command.success", "realm"),
        ("cowrie.session.file_download", "url"),
        ("cowrie.session.file_download", "destfile"),
        ("cowrie.session.file_upload", "destfile"),
        ("cowrie.direct-tcpip.data", "id"),
        ("cowrie.abuseipdb.ratelimited", "wake_at"),
        ("cowrie.virustotal.scanfile", "positives"),
    ],
)
def test_conditional_attributes_are_not_required(eventid: str, name: str) -> None:
    assert _is_conditional(_docs(eventid)[name])
    assert name not in REQUIRED_ATTRIBUTES.get(eventid, ())


# --- shape, eventid ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, [], [_event("cowrie.session.connect")], "{}", 1, Decimal(1), True])
def test_not_an_object(value: object) -> None:
    assert validate_event(value) == ValidationResult(False, ("not_an_object",))


def test_missing_eventid() -> None:
    assert validate_event({"session": SESSION, "timestamp": TIMESTAMP}).errors == ("missing_eventid",)


@pytest.mark.parametrize(
    ("eventid", "error"),
    [
        ("cowrie.system.info", "unknown_eventid: cowrie.system.info"),
        ("cowrie.session.command", "unknown_eventid: cowrie.session.command"),
        ("COWRIE.SESSION.CONNECT", "unknown_eventid: COWRIE.SESSION.CONNECT"),
        ("", "unknown_eventid: "),
        (None, "unknown_eventid: None"),
        (["cowrie.session.connect"], "unknown_eventid: ['cowrie.session.connect']"),
    ],
)
def test_unknown_eventid(eventid: object, error: str) -> None:
    assert validate_event(_event(eventid)).errors == (error,)


# --- timestamp --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "2024-01-15T10:30:00.123456Z",
        "2024-01-15T10:30:00Z",
        "2024-01-15T10:30:00.123Z",
        "2024-01-15T10:30:00.123456+00:00",
        "2024-01-15T10:30:00+0000",
        "2024-01-15T12:30:00-02:00",
    ],
)
def test_valid_timestamps(value: str) -> None:
    assert validate_event(_event("cowrie.session.connect", timestamp=value))


@pytest.mark.parametrize(
    "value",
    [
        "not-a-timestamp",
        "2024-01-15T10:30:00",  # no zone: Cowrie always writes UTC explicitly
        "2024-01-15 10:30:00Z",
        "2024-01-15",
        "2024-13-15T10:30:00Z",
        "2024-01-15T24:00:00Z",
        "2024-01-15T10:30:00.1234567Z",
        "2024-01-15T10:30:60Z",
        "2024-02-30T10:30:00Z",
        "2024-01-15T10:30:00+05:90",  # Python's datetime takes minutes past 59 in an offset; PostgreSQL refuses
        "2024-01-15T10:30:00+0560",
        "2024-01-15T10:30:00+16:00",  # timestamptz's offsets end at 15:59
        "٢٠٢٤-01-15T10:30:00Z",
        " 2024-01-15T10:30:00Z",
        1705314600,
        None,
    ],
)
def test_invalid_timestamps(value: object) -> None:
    result = validate_event(_event("cowrie.session.connect", timestamp=value))
    assert result.errors == (f"invalid_timestamp_format: {value}",)


def test_every_timestamp_validation_takes_is_one_postgresql_takes(conn: psycopg.Connection) -> None:
    """An event goes to raw_events only with a timestamp its timestamptz column takes: one it refuses would fail the
    whole batch's write, every time the file is read. Near misses of valid timestamps, each one character off."""
    rng = random.Random(7)
    bases = [
        "2024-02-29T23:59:59.123456+15:59",
        "2023-12-31T00:00:00-0230",
        "2018-05-01T12:34:56+05:30",
        "2019-01-01T00:00:00Z",
    ]
    values = set()
    for _ in range(3000):
        chars = list(rng.choice(bases))
        chars[rng.randrange(len(chars))] = rng.choice("0123456789-:T.Z+")
        values.add("".join(chars))
    taken = sorted(v for v in values if validate_event(_event("cowrie.session.connect", timestamp=v)))
    assert len(taken) > 100
    refused = []
    for value in taken:
        try:
            with conn.transaction():
                conn.execute("SELECT %s::text::timestamptz", (value,))
        except psycopg.errors.DataError:
            refused.append(value)
    assert refused == []


def test_missing_timestamp() -> None:
    event = _event("cowrie.session.connect")
    del event["timestamp"]
    assert validate_event(event).errors == ("missing_timestamp",)


# --- session ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["3f2a9c0b1d4e", "5d77535d8ac4", "abc12345", "C0FFEE01", "000000000000"])
def test_is_session_id_true(value: str) -> None:
    assert is_session_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "3F2A9C0B1D4E",
        "3f2a9c0b1d4",
        "3f2a9c0b1d4e0",
        "abc1234",
        "not-valid-session-id-123",
        "3f2a9c0b1d4g",
        "",
        None,
        12345678,
        "3f2a9c0b1d4e\n",
        "abc12345\n",
    ],
)
def test_is_session_id_false(value: object) -> None:
    assert not is_session_id(value)


def test_invalid_and_missing_session() -> None:
    assert validate_event(_event("cowrie.session.connect", session="xyz")).errors == ("invalid_session_id_format: xyz",)
    event = _event("cowrie.session.connect")
    del event["session"]
    assert validate_event(event).errors == ("missing_session",)


@pytest.mark.parametrize("eventid", sorted(i for i in event_ids() if i.startswith("cowrie.abuseipdb.")))
def test_abuseipdb_events_have_no_session(eventid: str) -> None:
    assert "cowrie.abuseipdb.* are operational: no session, only in cowrie.log" in _catalogue()["notes"]
    required = {name: "x" for name in REQUIRED_ATTRIBUTES.get(eventid, ())}
    assert validate_event({"eventid": eventid, "timestamp": TIMESTAMP, **required})
    # a session, if one is there, must still look like one
    bad = validate_event({"eventid": eventid, "timestamp": TIMESTAMP, "session": "nope"})
    assert bad.errors == ("invalid_session_id_format: nope",)


# --- addresses and ports ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["src_ip", "dst_ip"])
@pytest.mark.parametrize("value", ["192.168.1.100", "0.0.0.0", "2001:db8::1", "::ffff:203.0.113.10", "fe80::1"])
def test_valid_ips(field: str, value: str) -> None:
    assert validate_event(_event("cowrie.session.connect", **{field: value}))


@pytest.mark.parametrize("field", ["src_ip", "dst_ip"])
@pytest.mark.parametrize(
    "value", ["999.999.999.999", "1.2.3", "01.2.3.4", "example.com", "", 16909060, None, "fe80::1%eth0"]
)
def test_invalid_ips(field: str, value: object) -> None:
    result = validate_event(_event("cowrie.session.connect", **{field: value}))
    assert result.errors == (f"invalid_{field}: {value}",)


@pytest.mark.parametrize("eventid", sorted(i for i in event_ids() if i.startswith("cowrie.direct-tcpip.")))
def test_direct_tcpip_dst_may_be_a_requested_hostname(eventid: str) -> None:
    """SSH direct-tcpip carries the host the client asked for, so Cowrie logs names like ya.ru as dst_ip."""
    assert validate_event(_event(eventid, dst_ip="ya.ru", dst_port=443, data="x", ja4="x", ja4h="x"))
    assert validate_event(_event(eventid, dst_ip="")).errors == ("invalid_dst_ip: ",)


@pytest.mark.parametrize("field", ["src_port", "dst_port"])
@pytest.mark.parametrize("value", [0, 22, 65535, Decimal("50122"), Decimal("22.0"), Decimal("2.2E+1")])
def test_valid_ports(field: str, value: object) -> None:
    assert validate_event(_event("cowrie.session.connect", **{field: value}))


@pytest.mark.parametrize("field", ["src_port", "dst_port"])
@pytest.mark.parametrize(
    "value",
    [-1, 65536, "22", 22.0, True, None, Decimal("22.5"), Decimal("-1"), Decimal("NaN"), Decimal("Infinity")],
)
def test_invalid_ports(field: str, value: object) -> None:
    result = validate_event(_event("cowrie.session.connect", **{field: value}))
    assert result.errors == (f"invalid_{field}: {value}",)


# --- per-event required attributes and light types -------------------------------------------------------


@pytest.mark.parametrize("eventid", ["cowrie.login.success", "cowrie.login.failed"])
def test_login_requires_username_not_password(eventid: str) -> None:
    assert validate_event(_event(eventid, password="x")).errors == ("missing_required_field: username",)
    # public-key login (core/checkers.py): username + key, no password
    assert validate_event(_event(eventid, username="root", fingerprint="aa:bb", key="ssh-rsa AAAA", type="ssh-rsa"))


def test_command_input_uses_input_not_command() -> None:
    assert validate_event(_event("cowrie.command.input", input="uname -a"))
    result = validate_event(_event("cowrie.command.input", command="uname -a"))
    assert result.errors == ("missing_required_field: input",)


@pytest.mark.parametrize(("eventid", "names"), sorted(REQUIRED_ATTRIBUTES.items()))
def test_every_required_attribute_is_reported(eventid: str, names: tuple[str, ...]) -> None:
    assert validate_event(_event(eventid)).errors == tuple(f"missing_required_field: {n}" for n in names)


@pytest.mark.parametrize("eventid", sorted(event_ids() - REQUIRED_ATTRIBUTES.keys()))
def test_events_without_required_attributes(eventid: str) -> None:
    assert validate_event(_event(eventid))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("shasum", "deadbeef1234567890abcdef1234567890abcdef1234567890abcdef1234567890"),  # 66 chars
        ("shasum", "a" * 63),
        ("shasum", "g" * 64),
        ("shasum", 0),
        ("sha256", "a" * 40),
        ("input", 42),
        ("input", None),
        ("username", ["root"]),
        ("password", Decimal(123456)),
    ],
)
def test_type_checks(field: str, value: object) -> None:
    result = validate_event(_event("cowrie.session.connect", **{field: value}))
    assert result.errors == (f"invalid_{field}: {value}",)


# --- real events a hand-kept event list rejects ------------------------------------------------------------

REAL_EVENTS = {
    "session-params": _event("cowrie.session.params", arch="linux-x64-lsb", src_ip="203.0.113.10"),
    "client-size": _event("cowrie.client.size", width=Decimal(80), height=Decimal(24)),
    "ipv6-connect": _event(
        "cowrie.session.connect", src_ip="2001:db8::1", src_port=50122, dst_ip="2001:db8::2", dst_port=22
    ),
    "12-hex-login": _event("cowrie.login.failed", session="5d77535d8ac4", username="raspberry", password="admin"),
    "command-input": _event("cowrie.command.input", input="ll", message="CMD: ll", sensor="honeypot-ssh"),
    "file-download": _event(
        "cowrie.session.file_download", url="http://198.51.100.20/x", shasum=SHA, outfile=f"dl/{SHA}"
    ),
    "stdin-capture": _event("cowrie.session.file_download", shasum=SHA, outfile=f"dl/{SHA}"),
    "kex": _event("cowrie.client.kex", hassh="f555226df1963d1d3c09daf865abdc9a", kexAlgs=["curve25519-sha256"]),
    "session-closed-old": _event("cowrie.session.closed", duration=Decimal("3.08"), session="c0ffee01"),
    "late-event": _event("cowrie.log.closed", ttylog="var/lib/cowrie/tty/x", late=True),
    "abuseipdb": {"eventid": "cowrie.abuseipdb.reportedip", "timestamp": TIMESTAMP, "IP": "1.2.3.4"},
}


@pytest.mark.parametrize("event", REAL_EVENTS.values(), ids=REAL_EVENTS.keys())
def test_real_cowrie_events_pass(event: dict[str, Any]) -> None:
    assert validate_event(event) == ValidationResult(True, ())


# --- result semantics -------------------------------------------------------------------------------------


def test_collects_every_error_in_a_fixed_order() -> None:
    event = {
        "eventid": "cowrie.login.success",
        "timestamp": "yesterday",
        "src_ip": "1.2.3.999",
        "src_port": 70000,
        "dst_ip": "host",
        "dst_port": "22",
        "password": 1,
    }
    expected = (
        "invalid_timestamp_format: yesterday",
        "missing_session",
        "invalid_src_ip: 1.2.3.999",
        "invalid_src_port: 70000",
        "invalid_dst_ip: host",
        "invalid_dst_port: 22",
        "invalid_password: 1",
        "missing_required_field: username",
    )
    assert validate_event(event).errors == expected
    assert validate_event(dict(reversed(event.items()))).errors == expected


def test_result_is_frozen_and_truthy_when_valid() -> None:
    ok, bad = validate_event(REAL_EVENTS["kex"]), validate_event({})
    assert ok and ok.valid and ok.errors == ()
    assert not bad and not bad.valid
    assert bad.errors == ("missing_eventid", "missing_timestamp", "missing_session")
    with pytest.raises(AttributeError):  # immutable
        ok.valid = False  # type: ignore[misc]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.decimals(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
KEYS = st.sampled_from(["eventid", "timestamp", "session", "src_ip", "dst_ip", "src_port", "shasum", "input"])


@given(st.one_of(JSON, st.dictionaries(KEYS, JSON | st.sampled_from(sorted(event_ids())))))
def test_never_raises_or_mutates(event: object) -> None:
    before = copy.deepcopy(event)
    result = validate_event(event)
    assert result.valid == (not result.errors)
    assert event == before  # JSON numbers are finite: our parser rejects NaN and Infinity


# --- the shared cowrieprocessor cases ---------------------------------------------------------------------


def test_all_twelve_validate_cases_are_scored() -> None:
    assert len(VALIDATE_CASES) == 12
    assert set(CATALOGUE_WINS) <= {c["id"] for c in VALIDATE_CASES}


@pytest.mark.parametrize("case", VALIDATE_CASES, ids=[c["id"] for c in VALIDATE_CASES])
def test_shared_validate_case(case: dict[str, Any]) -> None:
    event, expected = case["input"], case["expected"]
    before = copy.deepcopy(event)
    result = validate_event(event)
    assert event == before
    assert result.valid is expected["valid"], result.errors
    if expected["valid"]:
        assert result.errors == ()
    overruled = CATALOGUE_WINS.get(case["id"], ("",))[0]
    for error in expected.get("errors_include", []):
        if error != overruled:
            assert error in result.errors
    for prefix in expected.get("errors_include_prefix", []):
        assert any(e.startswith(prefix) for e in result.errors), (prefix, result.errors)


@pytest.mark.parametrize("case_id", sorted(CATALOGUE_WINS))
def test_catalogue_conflicts_are_still_conflicts(case_id: str) -> None:
    error, eventid, name, _why = CATALOGUE_WINS[case_id]
    case = next(c for c in VALIDATE_CASES if c["id"] == case_id)
    assert error in case["expected"]["errors_include"]  # the reference still expects it ...
    assert error not in validate_event(case["input"]).errors  # ... we still do not emit it ...
    assert _is_conditional(_docs(eventid)[name])  # ... because the catalogue still says it is conditional
