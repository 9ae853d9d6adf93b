"""Strict JSON parsing and the canonical payload form shared with PostgreSQL.

The canonical form of a payload is exactly PostgreSQL's ``jsonb::text`` output, so the SHA-256 checksum that
Python computes before an insert is the one ``dlq_payload_checksum(jsonb)`` computes in SQL: keys sorted by
UTF-8 length then bytes, duplicate keys resolved last-wins, numbers printed as ``numeric`` prints them.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal, InvalidOperation
from typing import Any


class NotStorableJSON(ValueError):
    """The text is JSON, or almost, but PostgreSQL ``jsonb`` cannot hold it as it is."""


class DuplicateKeys(ValueError):
    """An object holds one key twice: jsonb would keep only the last value (asked for with ``unique_keys``)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise DuplicateKeys("an object holds a key twice")
    return value


def _reject_constant(name: str) -> Any:
    raise NotStorableJSON(f"{name} is not a JSON number")


# PostgreSQL numeric (hence jsonb) holds at most 131072 digits before the point and 16383 after it.
MAX_INTEGER_DIGITS, MAX_FRACTION_DIGITS = 131072, 16383


class _NumberOutOfRange(Exception):
    """A number no PostgreSQL numeric holds (1e999999999 parses, but jsonb refuses it)."""


def _parse_number(text: str) -> Decimal:
    """Exact, and checked against numeric's limits while parsing (no walk over the value afterwards)."""
    try:
        value = Decimal(text)
    except InvalidOperation:  # an exponent past Decimal's own limit (1e99999999999999999999): no numeric holds it
        raise _NumberOutOfRange(text[:40]) from None
    if len(text) < MAX_FRACTION_DIGITS and "e" not in text and "E" not in text:
        return value  # too few digits to exceed either limit: no need to look (most numbers are ports)
    exponent = value.as_tuple().exponent
    if value.adjusted() >= MAX_INTEGER_DIGITS or (isinstance(exponent, int) and -exponent > MAX_FRACTION_DIGITS):
        raise _NumberOutOfRange(text[:40])
    return value


def _parse_integer(text: str) -> int | Decimal:
    """An integer token as an int (validation and rendering take ints several times faster than Decimals); past
    Python's 4,300-digit conversion limit, the Decimal numeric's limits are checked on."""
    return int(text) if len(text) < 4300 else _parse_number(text)


def storable_number(text: str) -> Decimal:
    """A number token as jsonb would hold it, or ``NotStorableJSON`` when numeric cannot."""
    try:
        return _parse_number(text)
    except _NumberOutOfRange as exc:
        raise NotStorableJSON(f"number {exc} does not fit PostgreSQL numeric") from None


def _decoder(*, lenient: bool = False, unique: bool = False, long_ints: bool = False) -> json.JSONDecoder:
    """Integers parse in C (a Python hook per integer costs 0.4 µs); past int()'s 4,300-digit limit C raises a plain
    ValueError, and the text is parsed again by ``long_ints``'s hook, which takes them as Decimals."""
    return json.JSONDecoder(
        parse_float=_parse_number, parse_int=_parse_integer if long_ints else None, parse_constant=_reject_constant,
        strict=not lenient, object_pairs_hook=_unique_object if unique else None,
    )  # fmt: skip


# One decoder of each kind for every call: json.loads with hooks builds a new one each time (2.9 µs vs 1.6 µs per
# event). Lenient: raw control characters inside strings read as the characters they are (json.loads(strict=False)):
# a producer that wrote a tab or a newline unescaped still meant that character. Unique: a key twice raises.
_DECODERS = {
    (lenient, unique, long_ints): _decoder(lenient=lenient, unique=unique, long_ints=long_ints)
    for lenient in (False, True) for unique in (False, True) for long_ints in (False, True)
}  # fmt: skip
_UNCHECKED = json.JSONDecoder(parse_float=str, parse_int=str, parse_constant=_reject_constant)  # syntax alone
_SCAN = _DECODERS[False, False, False].scan_once
_SKIP_BLANKS = json.decoder.WHITESPACE.match
_BLANKS = " \t\n\r"


def _decode(text: str, scan: Any = _SCAN) -> Any:
    """``JSONDecoder.decode(text)`` with its two Python frames inlined, and the blank skips only where a blank is:
    the same value, the same errors at the same positions."""
    start = _SKIP_BLANKS(text, 0).end() if text[:1] in _BLANKS else 0  # '' is "in" any string: no text, scan
    try:
        value, end = scan(text, start)
    except StopIteration as err:
        raise json.JSONDecodeError("Expecting value", text, err.value) from None
    if end != len(text) and (end := _SKIP_BLANKS(text, end).end()) != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _check_string(value: str) -> None:
    if "\x00" in value:
        raise NotStorableJSON("string holds a NUL character (\\u0000), which jsonb cannot store")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NotStorableJSON("string holds a lone UTF-16 surrogate") from exc


def _check(value: Any) -> None:
    if isinstance(value, str):
        _check_string(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key)
            _check(item)
    elif isinstance(value, list):
        for item in value:
            _check(item)


def loads(
    text: str | bytes, *, encodable: bool = False, control_characters: bool = False, unique_keys: bool = False
) -> Any:
    """Parse JSON the way jsonb accepts it: exact decimals, no NaN/Infinity, no NUL, no lone surrogates.

    Duplicate keys resolve last-wins, as in jsonb. Raises ``json.JSONDecodeError`` (a ``ValueError``) for
    text that is not JSON and ``NotStorableJSON`` for JSON that jsonb rejects. ``encodable``: the caller knows
    the text encodes as UTF-8 (it was decoded from UTF-8, or checked), so it holds no lone surrogate to look for.
    ``control_characters``: raw control characters inside strings are taken as data (a raw NUL is still refused).
    ``unique_keys``: an object holding a key twice raises ``DuplicateKeys``, which may come before a fault further
    on in the text (parse again without it to learn of that).
    """
    from_bytes = isinstance(text, bytes)
    if from_bytes:
        text = text.decode("utf-8")
    if text.startswith("\ufeff"):  # as json.loads says it (the decoder itself would not)
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    if control_characters and "\x00" in text:
        raise NotStorableJSON("text holds a NUL character, which jsonb cannot store")
    try:
        try:
            value = _parse(text, control_characters, unique_keys, long_ints=False)
        except ValueError as exc:
            if type(exc) is not ValueError:  # JSONDecodeError, NotStorableJSON, DuplicateKeys: the text's own fault
                raise
            value = _parse(text, control_characters, unique_keys, long_ints=True)  # an integer of 4,300+ digits
    except _NumberOutOfRange as exc:
        _UNCHECKED.decode(text)  # a text that is no JSON at all says so first, whatever number it starts with
        raise NotStorableJSON(f"number {exc} does not fit PostgreSQL numeric") from None
    if "\\u" in text:  # a NUL or a lone surrogate can only come from an escape (the parser refuses raw NULs)
        _check(value)
    elif not (from_bytes or encodable):  # ... or from the text itself, when it was handed over as str
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise NotStorableJSON("string holds a lone UTF-16 surrogate") from exc
    return value


def _parse(text: str, lenient: bool, unique: bool, *, long_ints: bool) -> Any:
    decoder = _DECODERS[lenient, unique, long_ints]
    return decoder.decode(text) if lenient else _decode(text, decoder.scan_once)


def _number(value: Decimal | int | float) -> str:
    if isinstance(value, bool):
        raise TypeError("bool is not a number here")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise NotStorableJSON("NaN and Infinity are not JSON numbers")
        value = Decimal(repr(value))
    elif isinstance(value, int):
        return str(value)
    text = format(value, "f")
    return text[1:] if value == 0 and text.startswith("-") else text


def _sort_key(key: str) -> tuple[int, bytes]:
    raw = key.encode("utf-8")
    return (len(raw), raw)


class _NotPlain(Exception):
    """A value the C encoder cannot render as jsonb does (a decimal whose text is not a float's repr)."""


# jsonb::text's separators; its string escapes are json.dumps's with ensure_ascii off (\" \\ \b \f \n \r \t, other
# control characters as \u00xx, everything else as itself).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "), check_circular=False, allow_nan=False)
# The C encoder built once (JSONEncoder.encode builds one per call, a microsecond an event); absent, the class's.
_C_ENCODER = (
    None
    if json.encoder.c_make_encoder is None
    else json.encoder.c_make_encoder(
        None, _ENCODER.default, json.encoder.encode_basestring, None, ": ", ", ", False, False, False
    )
)


def _encode(value: Any) -> str:
    return _ENCODER.encode(value) if _C_ENCODER is None else "".join(_C_ENCODER(value, 0))


# The jsonb order of a set of keys, by the keys in the order the record held them: a log holds a few dozen shapes.
_KEY_ORDERS: dict[tuple[str, ...], list[str]] = {}
_KEY_ORDERS_KEPT = 4096


def _jsonb_order(value: dict[str, Any]) -> list[str]:
    held = tuple(value)
    if (keys := _KEY_ORDERS.get(held)) is None:
        keys = sorted(value, key=_sort_key)
        if len(_KEY_ORDERS) >= _KEY_ORDERS_KEPT:
            _KEY_ORDERS.clear()
        _KEY_ORDERS[held] = keys
    return keys


def _plain(value: Any) -> Any:
    """``value`` rebuilt for the C encoder: objects in jsonb's key order (UTF-8 length, then bytes), decimals as the
    int or float that prints the same text. Raises ``_NotPlain`` otherwise."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:  # strings, most values, are taken as they are without a call
        return {key: item if type(item := value[key]) is str else _plain(item) for key in _jsonb_order(value)}
    if kind is list:
        return [item if type(item) is str else _plain(item) for item in value]
    if kind is Decimal and value.is_finite():
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent >= 0 and value.adjusted() < 4000:  # str(int) limit: 4300 digits
            return int(value)
        as_float = float(value)
        if as_float and repr(as_float) == format(value, "f"):  # 0.25, not 1.50, 1e-07 or -0.0 (numeric's 0.0)
            return as_float
    raise _NotPlain


def canonical_json(value: Any) -> str:
    """Render a parsed JSON value exactly as PostgreSQL renders the same value as ``jsonb::text``.

    Through the C encoder when every value allows it (ordinary events: 4 times faster), else value by value."""
    try:
        return _encode(_plain(value))
    except _NotPlain:
        return _render(value)


def _render(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float | Decimal):
        return _number(value)
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: _sort_key(item[0]))
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_render(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def canonical_with_checksum(value: Any) -> tuple[str, str]:
    """The canonical form and its SHA-256, rendering once (what an insert sends to PostgreSQL)."""
    text = canonical_json(value)
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def payload_checksum(value: Any) -> str:
    """SHA-256 (hex) of the canonical form; equals ``dlq_payload_checksum(payload)`` in SQL."""
    return canonical_with_checksum(value)[1]
