"""Array parameters built as literals: whatever the elements hold, PostgreSQL reads back exactly the list sent."""

from __future__ import annotations

import json

import psycopg
import pytest
from click.testing import CliRunner

from dlq_assets.cli import main
from dlq_assets.core.db import JSON_TEXTS_SQL, bigint_array, json_texts, normalize_url, redact, text_array

AWKWARD_TEXTS = [
    "plain",
    "",
    "NULL",
    "null",
    'with "quotes"',
    "back\\slash\\",
    "a,b",
    "{braces}",
    "  spaced  ",
    "tab\tnew\nline",
    "\x1e separator \x1f unit",
    "ünïcödé ✓ 𝄞",
    None,
]


def test_bigint_arrays_round_trip(server_url: str) -> None:
    values = [0, -1, 2**63 - 1, -(2**63), None, 42]
    with psycopg.connect(server_url) as conn:
        assert conn.execute("SELECT %s::bigint[]", (bigint_array(values),)).fetchone()[0] == values
        assert conn.execute("SELECT %s::bigint[]", (bigint_array([]),)).fetchone()[0] == []


def test_bigint_arrays_take_only_integers() -> None:
    with pytest.raises(ValueError):
        bigint_array(["1,2"])  # type: ignore[list-item]  # never two elements out of one


def test_text_arrays_round_trip_any_text(server_url: str) -> None:
    with psycopg.connect(server_url) as conn:
        for values in (AWKWARD_TEXTS, [None], [""], []):
            assert conn.execute("SELECT %s::text[]", (text_array(values),)).fetchone()[0] == values


def test_json_texts_arrive_as_the_same_jsonb_values(server_url: str) -> None:
    texts = ['{"a": "x\\u001ey", "b": [1, 2.50]}', '"\\"quoted\\\\"', "[]", "null", "1e5"]
    with psycopg.connect(server_url) as conn:
        (stored,) = conn.execute(
            f"SELECT array_agg(t::jsonb::text ORDER BY n) FROM unnest({JSON_TEXTS_SQL}) WITH ORDINALITY AS u(t, n)",
            (json_texts(texts),),
        ).fetchone()
        expected = conn.execute("SELECT array_agg(t::jsonb::text ORDER BY n) FROM unnest(%s::text[]) WITH ORDINALITY "
                                "AS u(t, n)", (texts,)).fetchone()[0]  # fmt: skip
    assert stored == expected and len(stored) == len(texts)
    assert json.loads(stored[0]) == {"a": "x\x1ey", "b": [1, 2.5]}  # an escaped separator is just a character


@pytest.mark.parametrize("texts", [[], [""], ['{"a": 1}', ""], ['{"a": "\x1e"}']])
def test_json_texts_refuse_what_would_split_wrongly(texts: list[str]) -> None:
    with pytest.raises(ValueError):
        json_texts(texts)


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://postgres:S3cret E@127.0.0.1:1/x", "S3cret"),  # a space: libpq quotes the password
        ("postgresql://postgres:pa%ss@127.0.0.1:1/x", "pa%ss"),  # a bad escape: libpq quotes it too
        ("postgresql://postgres:abc@Tail99Secret@127.0.0.1:1/x", "Tail99Secret"),  # "@": libpq takes it for a host
        ("postgresql://postgres:abc@HUNTER%32PASS@127.0.0.1:1/x", "HUNTER2PASS"),  # and decodes what follows
        ("postgresql://postgres:SEC'RET\"SECRET@127.0.0.1:1/x", "SECRET"),  # quotes
    ],
)
def test_no_part_of_an_oddly_written_password_reaches_an_error(url: str, secret: str) -> None:
    with pytest.raises((ValueError, psycopg.Error)) as raised:
        psycopg.connect(normalize_url(url), connect_timeout=3).close()
    assert secret not in redact(str(raised.value), url)
    result = CliRunner().invoke(main, ["--database-url", url, "health"])
    assert result.exit_code != 0 and secret not in result.output, result.output
