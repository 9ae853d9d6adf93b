"""The canonical payload form and its checksum agree byte for byte between Python and PostgreSQL."""

from __future__ import annotations

import json
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dlq_assets.core import jsonutil

TRICKY_PAYLOADS = [
    '{"b": 1, "a": 2}',
    '{"aa": 1, "b": 2, "ab": 3, "é": 4, "z": 5, "ä": 6, "日本": 7}',
    '{"dup": 1, "dup": 2}',
    '{"s": "caf\\u00e9 \\ud83d\\ude00 日本語 \\t\\n\\r\\b\\f \\u001f \\" \\\\ /"}',
    '{"f": [0.1, 1.0, 1.50, -0.0, -0, 1e2, 1.0E+2, 1.5e-7, 2.5E3, 123456789.987654321]}',
    '{"big": 123456789012345678901234567890, "neg": -98765432109876543210, "e": 1e400, "tiny": 1e-30}',
    '{"n": {"m": {"o": [1, [2, [3, {"p": null, "q": true, "r": false}]]]}}}',
    "[]",
    "{}",
    '"just a string"',
    "42",
    '[{"k": []}, {}, "", 0]',
    '{"controls": "\\u0001\\u0016\\u007f\\u0080"}',
    '{"key with spaces": 1, "": 2, " ": 3}',
]


def stored_checksum(conn: psycopg.Connection, text: str) -> str:
    """raw_events.payload_checksum (a generated column) of a payload written as this text, the row undone."""
    with conn.transaction(force_rollback=True):
        return conn.execute(
            "INSERT INTO raw_events (source, source_inode, source_offset, eventid, payload) "
            "VALUES ('checksum', '1', 0, 'x', %s::jsonb) RETURNING payload_checksum",
            (text,),
        ).fetchone()[0]


@pytest.mark.parametrize("text", TRICKY_PAYLOADS)
def test_python_canonical_form_equals_jsonb_text(conn: psycopg.Connection, text: str) -> None:
    value = jsonutil.loads(text)
    jsonb_text, sql_checksum = conn.execute(
        "SELECT %s::jsonb::text, dlq_payload_checksum(%s::jsonb)", (text, text)
    ).fetchone()
    assert jsonutil.canonical_json(value) == jsonb_text
    assert jsonutil.payload_checksum(value) == sql_checksum == stored_checksum(conn, text)
    assert len(sql_checksum) == 64


def test_the_sql_checksum_is_inlined_where_it_is_used(conn: psycopg.Connection) -> None:
    """A SQL function PostgreSQL cannot inline runs as a call of its own per row (10_cowrie.sql: 2.5-4.8 µs against
    1.6 µs): writing raw_events and every insert take it once per row."""
    plan = "\n".join(
        row[0] for row in conn.execute("EXPLAIN (VERBOSE) SELECT dlq_payload_checksum(payload) FROM raw_events")
    )
    assert "sha256(convert_to" in plan and "dlq_payload_checksum" not in plan, plan


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(lambda d: abs(d.adjusted()) < 200)
    | st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def _render(value: object) -> str:
    """JSON text that carries each Decimal verbatim, so PostgreSQL reads the exact number."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_random_payloads_agree_with_postgres(conn: psycopg.Connection, value: object) -> None:
    text = _render(value)
    (sql_checksum,) = conn.execute("SELECT dlq_payload_checksum(%s::jsonb)", (text,)).fetchone()
    assert jsonutil.payload_checksum(jsonutil.loads(text)) == sql_checksum == stored_checksum(conn, text)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"a": "\\u0000"}', jsonutil.NotStorableJSON),
        ('{"a": "\\ud800"}', jsonutil.NotStorableJSON),
        ('{"a": [1, {"b": ["x\\u0000"]}]}', jsonutil.NotStorableJSON),
        ('{"\\u0000": 1}', jsonutil.NotStorableJSON),
        ('{"a": NaN}', jsonutil.NotStorableJSON),
        ('{"a": Infinity}', jsonutil.NotStorableJSON),
        ('{"a": 1e131072}', jsonutil.NotStorableJSON),  # numeric: 131072 digits before the point at most
        ('{"a": [2, -1E+999999999]}', jsonutil.NotStorableJSON),
        ('{"a": 1e-16384}', jsonutil.NotStorableJSON),  # ... and 16383 after it
        ('{"a": 0.5e-16383}', jsonutil.NotStorableJSON),
        ('{"a": 1e9999999999999999999}', jsonutil.NotStorableJSON),  # past Decimal's own exponent limit too
        ('{"a": [-2.5E-99999999999999999999]}', jsonutil.NotStorableJSON),
        ("[1e9999999999999999999, x]", json.JSONDecodeError),
        ('7e3776096bc8", "x": 1}', json.JSONDecodeError),  # no JSON: that comes first, whatever its numbers
        ("[1e999999999, ]", json.JSONDecodeError),
        ('{"a": 1,}', json.JSONDecodeError),
        ("not json", json.JSONDecodeError),
    ],
)
def test_loads_rejects_what_jsonb_rejects(conn: psycopg.Connection, text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        jsonutil.loads(text)
    with pytest.raises(psycopg.errors.DataError):
        conn.execute("SELECT %s::jsonb", (text,))


@pytest.mark.parametrize("text", ['{"a": 1e131071}', '{"a": -9e-16383}', '{"a": 0.5e-16382}', '{"\\\\u": "\\\\u0000"}'])
def test_loads_accepts_what_jsonb_accepts_at_the_limits(conn: psycopg.Connection, text: str) -> None:
    value = jsonutil.loads(text)
    assert jsonutil.canonical_json(value) == conn.execute("SELECT %s::jsonb::text", (text,)).fetchone()[0]


def test_a_lone_surrogate_in_the_text_itself_is_refused() -> None:
    with pytest.raises(jsonutil.NotStorableJSON):
        jsonutil.loads('{"a": "\ud800"}')  # the character, not an escape: no jsonb can hold it either


def test_loads_keeps_exact_decimals() -> None:
    assert jsonutil.loads('{"x": 0.1}') == {"x": Decimal("0.1")}
    assert jsonutil.canonical_json(jsonutil.loads("[1.10, 1e2]")) == "[1.10, 100]"


@pytest.mark.parametrize("options", [{}, {"unique_keys": True}, {"control_characters": True}])
def test_integers_past_the_digit_limit_of_int_parse_exactly(options: dict[str, bool]) -> None:
    """Integers parse in C, which refuses 4,300 digits or more (Python's int limit): such a text is parsed again
    with them as Decimals, never taken for a text that is not JSON."""
    digits = "9" * 5000
    value = jsonutil.loads(f'{{"a": [1, -{digits}], "b": 2}}', **options)
    assert value == {"a": [1, Decimal(f"-{digits}")], "b": 2} and type(value["a"][0]) is int
    assert jsonutil.canonical_json(value) == f'{{"a": [1, -{digits}], "b": 2}}'
    with pytest.raises(json.JSONDecodeError):
        jsonutil.loads(f'{{"a": {digits}, "b": }}', **options)
    if options.get("unique_keys"):
        with pytest.raises(jsonutil.DuplicateKeys):
            jsonutil.loads(f'{{"a": {digits}, "a": 1}}', **options)


def _outcome(parse: object, text: str) -> tuple[object, ...]:
    try:
        return ("value", parse(text))  # type: ignore[operator]
    except json.JSONDecodeError as exc:
        return ("error", exc.msg, exc.pos)
    except jsonutil._NumberOutOfRange as exc:  # a number numeric cannot hold (0E200000): raised while parsing
        return ("out of range", str(exc))


_JSONISH = st.text(alphabet=' \t\r\n{}[]":,0123456789.eE-+abtrufnl\\', max_size=24)


@settings(max_examples=400, deadline=None)
@given(
    body=st.one_of(st.sampled_from(TRICKY_PAYLOADS), _JSONISH),
    before=st.sampled_from(["", " ", "\r\n"]),
    after=st.sampled_from(["", " ", "\n\t", "x", ",", "}"]),
)
@example(body="0E200000", before="", after="")  # a number numeric cannot hold: the same error from both
def test_the_inlined_decode_is_the_decoders(body: str, before: str, after: str) -> None:
    """jsonutil's decode (the decoder's two Python frames inlined) gives the same value, or the same error message at
    the same position, as JSONDecoder.decode: repair's quick fixes read both."""
    text = before + body + after
    assert _outcome(jsonutil._decode, text) == _outcome(jsonutil._DECODERS[False, False, False].decode, text)


@settings(max_examples=2000, deadline=None)
@given(value=json_values | st.floats(allow_nan=False, allow_infinity=False).map(lambda f: Decimal(repr(f))))
@example(value={"é": 1, "z": 2, "ab": [Decimal("1.50"), Decimal("-0.0"), Decimal("1E+2"), Decimal("1e-7")]})
def test_the_c_encoder_path_renders_what_the_value_by_value_path_renders(value: object) -> None:
    """The fast path (C encoder over a reordered copy) and the path PostgreSQL equality is proven on agree."""
    assert jsonutil.canonical_json(value) == jsonutil._render(value)
