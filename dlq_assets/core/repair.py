"""Repair dead letters without inventing data: a repaired event holds only what its bytes held.

A naive repairer (the shared reference cases' anchor) fills missing usernames with "unknown", stamps missing
timestamps with the repair time and invents a ``cowrie.system.info`` event id. Here a repair may only read what
the bytes say: take raw control characters in strings as the characters they are, drop trailing commas,
re-escape stray backslashes, close brackets after a complete value (marked partial), read a Python literal dict,
split values written on one line, or join the fragments of one record; the result must pass Cowrie's catalogue
(:func:`validate_event`) or it is refused, with the reason why. Where the bytes allow two readings, it is refused.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dlq_assets.core import jsonutil
from dlq_assets.core.cowrie import validate_event

__all__ = [
    "MAX_GROUP",
    "MAX_INPUT_BYTES",
    "STRATEGIES",
    "TRUNCATION_CLOSED",
    "UNSTITCHABLE",
    "Fragment",
    "RepairResult",
    "Stitched",
    "raw_bytes_of",
    "repair_record",
    "stitch_fragments",
    "tokenizer_fix",
]

MAX_INPUT_BYTES = 1 << 20  # a Cowrie event is a few KiB: anything past this is not one record
MAX_DEPTH = 512  # as the reader's default; Cowrie nests two levels
MAX_GROUP = 64  # fragments per stitched record (a pretty-printed kex event is about 60 lines)
_MAX_REASON = 1000

AS_IS, TOKENIZER_FIX, STITCH = "as_is", "tokenizer_fix", "stitch"
CONTROL_CHARACTERS = "control_characters"  # raw tab, newline or CR inside a string, kept as that character
TRUNCATION_CLOSED = "truncation_closed"  # brackets closed after the last complete value: stored as partial
PYTHON_LITERAL = "python_literal"  # a dict written as Python's repr: True/False/None as true/false/null
SPLIT = "split"  # several complete values on one record: one event each, at its own byte offset
BOM_SKIPPED = "bom_skipped"  # a byte-order mark before an otherwise whole record
STRATEGIES = (AS_IS, BOM_SKIPPED, CONTROL_CHARACTERS, TOKENIZER_FIX, TRUNCATION_CLOSED, PYTHON_LITERAL, SPLIT, STITCH)

TOO_LARGE = "too_large"
NOT_TEXT = "not_text"
NUL_BYTE = "nul_byte"
NOT_JSON = "not_json"
NOT_AN_OBJECT = "not_an_object"
NOT_STORABLE = "not_storable"
CONTROL_CHARACTER = "control_character"
TRUNCATED_VALUE = "truncated_value"
UNCLOSED = "unclosed"
TRAILING_DATA = "trailing_data"
# An object holds a key twice: which value the producer meant is unknown, and a repaired event would keep one
# of them silently; the dead letter keeps the record whole instead.
DUPLICATE_KEYS = "duplicate_keys"
AMBIGUOUS_ESCAPE = "ambiguous_escape"  # a stray backslash beside escapes that may then be literal text
TOO_DEEPLY_NESTED = "too_deeply_nested"
VALIDATION_FAILED = "validation_failed"
# Refused before parsing: such a record is no piece of a stitched one either (a split at a newline leaves each line
# valid UTF-8 if the record was, and a group through a fragment that does not decode is refused).
UNSTITCHABLE = frozenset({TOO_LARGE, NOT_TEXT, NUL_BYTE})

_BLANKS = " \t\r\n"
_BOM = "\ufeff"
_CONTROL_ERROR = "Invalid control character"
_CONTROL = re.compile(r"[\x00-\x1f]")
_WS = re.compile(r"[ \t\r\n]*")
_STRING_BODY = re.compile(r'[^"\\\x00-\x1f]*')
_NUMBER_LIKE = re.compile(r"-?[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_SIMPLE_ESCAPES = frozenset('"\\/bfnrt')
_LITERALS = ("true", "false", "null")
_CLOSERS = {"{": "}", "[": "]"}
_VALUE, _KEY, _COLON, _AFTER = range(4)  # what the tokenizer expects next
# Cowrie's output layer (core/output.py emit) appends these after the event's own attributes, in every layout
# seen: current logs end "sensor, timestamp, src_ip, session", connect events "session, ..., sensor, timestamp",
# 2018 logs "src_ip, session, sensor". An unclosed record holding all four lost nothing but closing brackets;
# one lacking any may have lost whole pairs (2018's sensor after session), so closing it could drop them.
_APPENDED_LAST = ("sensor", "timestamp", "src_ip", "session")


class RepairResult(NamedTuple):
    """A valid event and the strategy that produced it, or no event and the reason (a tuple: one per event)."""

    event: dict[str, Any] | None
    strategy: str | None
    reason: str | None
    # The JSON text the event was parsed from (not canonical): a writer can hand it to jsonb as it is instead of
    # rendering the event again.
    text: str | None = None
    at: int = 0  # byte offset of the event's first byte in the record (past a byte-order mark, a split's parts)
    more: tuple[RepairResult, ...] = ()  # a split's further events, each with its own ``at``

    @property
    def repaired(self) -> bool:
        return self.event is not None


@dataclass(frozen=True)
class Fragment:
    """One dead letter of a source: ``key`` is its id, ``raw`` its record bytes at ``offset``."""

    key: Any
    offset: int
    raw: bytes


@dataclass(frozen=True)
class Stitched:
    """An event rebuilt from consecutive fragments; ``keys`` in offset order."""

    keys: tuple[Any, ...]
    event: dict[str, Any]
    strategy: str = STITCH
    text: str | None = field(default=None, compare=False, repr=False)  # as RepairResult.text


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _refused(reason: str) -> RepairResult:
    return RepairResult(None, None, reason)


# --- stored payload -> bytes ----------------------------------------------------------------------------------


def raw_bytes_of(payload: Any, payload_form: str | None) -> bytes:
    """The record's bytes back from a stored DLQ payload (see ``ingest.route``).

    ``json`` payloads were stored parsed, so their bytes come back as the canonical JSON text: same value,
    not necessarily the same bytes or length. Without a form (older rows) it is read off the payload's shape.
    """
    if payload_form is None:
        wrapped = isinstance(payload, dict) and len(payload) == 1
        payload_form = next((k for k in ("raw_text", "raw_base64") if wrapped and k in payload), "json")
    if payload_form == "raw_text":
        return payload["raw_text"].encode("utf-8")
    if payload_form == "raw_base64":
        return base64.b64decode(payload["raw_base64"], validate=True)
    if payload_form == "json":
        return jsonutil.canonical_json(payload).encode("utf-8")
    raise ValueError(f"unknown payload_form: {payload_form!r}")


# --- tokenizer ------------------------------------------------------------------------------------------------


def tokenizer_fix(text: str, *, close: bool = True) -> tuple[str | None, str | None]:
    """One linear tokenizer pass: ``(fixed JSON text, None)``, or ``(None, reason)`` when it cannot be fixed.

    It drops trailing commas, doubles a backslash that starts no JSON escape, and, with ``close``, closes open
    brackets, but only when the text ends right after a complete string, literal or bracket: a cut there lost
    whole pairs, never part of a value. A text ending inside a string, after a number (522 may be 52213), a
    key, ``:`` or ``,`` lost part of a value: ``truncated_value``. Keys and values are never added or filled.
    """
    try:
        return _fix(text, close)[0], None
    except _Refused as exc:
        return None, exc.reason


def _fix(text: str, close: bool) -> tuple[str, int]:
    """The fixed text, and how many brackets had to be closed."""
    n = len(text)
    i = _WS.match(text).end()
    if i == n or text[i] != "{":
        raise _Refused(NOT_AN_OBJECT if text.startswith("[", i) else NOT_JSON)
    out: list[str] = []
    stack: list[str] = []
    state, empty, comma, number = _VALUE, False, -1, False  # comma: index in out of a comma awaiting a value
    while True:
        j = _WS.match(text, i).end()
        if j > i:
            out.append(text[i:j])
            i = j
        if i == n:
            break
        c = text[i]
        if not stack and state == _AFTER:
            raise _Refused(TRAILING_DATA)
        if c in "{[":
            if state != _VALUE:
                raise _Refused(NOT_JSON)
            if len(stack) >= MAX_DEPTH:
                raise _Refused(TOO_DEEPLY_NESTED)
            stack.append(c)
            out.append(c)
            i += 1
            state, empty, comma, number = (_KEY if c == "{" else _VALUE), True, -1, False
            continue
        if c in "}]":
            if not stack or _CLOSERS[stack[-1]] != c:
                raise _Refused(NOT_JSON)
            if comma >= 0:
                out[comma] = ""  # a trailing comma
            elif state != _AFTER and not empty:
                raise _Refused(NOT_JSON)
            stack.pop()
            out.append(c)
            i += 1
            state, empty, comma, number = _AFTER, False, -1, False
            continue
        if c == ",":
            if state != _AFTER:
                raise _Refused(NOT_JSON)
            comma = len(out)
            out.append(c)
            i += 1
            state, number = (_KEY if stack[-1] == "{" else _VALUE), False
            continue
        if c == ":":
            if state != _COLON:
                raise _Refused(NOT_JSON)
            out.append(c)
            i += 1
            state = _VALUE
            continue
        if c == '"' and state in (_KEY, _VALUE):
            i = _string(text, i, out)
            state = _COLON if state == _KEY else _AFTER
            number = False
        elif state != _VALUE:
            raise _Refused(NOT_JSON)
        else:
            number = text[i] not in "tfn"
            i = _scalar(text, i, out)
            state = _AFTER
        empty, comma = False, -1
    if not stack:
        return "".join(out), False
    if state != _AFTER or number:
        raise _Refused(TRUNCATED_VALUE)
    if not close:
        raise _Refused(UNCLOSED)
    out.extend(_CLOSERS[b] for b in reversed(stack))
    return "".join(out), len(stack)


def _string(text: str, i: int, out: list[str]) -> int:
    """Copy the string opening at ``text[i]``, fixing stray backslashes; the index after its closing quote.

    A stray backslash shows a writer that does not escape backslashes: in the same string, ``\\n`` or ``\\\\``
    may then be a newline or the two characters it shows, so such a string is refused (``\\"`` alone stays:
    without it the string would have ended there).
    """
    n = len(text)
    out.append('"')
    i += 1
    stray = escaped = False
    while True:
        j = _STRING_BODY.match(text, i).end()
        out.append(text[i:j])
        if j == n:
            raise _Refused(TRUNCATED_VALUE)
        if text[j] == '"':
            if stray and escaped:
                raise _Refused(AMBIGUOUS_ESCAPE)
            out.append('"')
            return j + 1
        if text[j] == "\x00":  # jsonb holds no NUL, and dropping it would change the value
            raise _Refused(NUL_BYTE)
        if text[j] != "\\":  # a raw control character: the writer's data, kept as it is (never escaped by us)
            out.append(text[j])
            i = j + 1
            continue
        if j + 1 == n:
            raise _Refused(TRUNCATED_VALUE)
        if text[j + 1] in _SIMPLE_ESCAPES:
            escaped = escaped or text[j + 1] != '"'
            out.append(text[j : j + 2])
            i = j + 2
        elif text[j + 1] == "u" and _HEX4.match(text, j + 2):
            escaped = True
            out.append(text[j : j + 6])
            i = j + 6
        else:  # a literal backslash the writer did not escape (C:\Users, \x41): escape it
            stray = True
            out.append("\\\\")
            i = j + 1


def _scalar(text: str, i: int, out: list[str]) -> int:
    """Copy a number or literal; a text ending in one that may be cut short is a truncated value."""
    n = len(text)
    m = _NUMBER_LIKE.match(text, i)
    if m.end() > i:
        if m.end() == n:
            raise _Refused(TRUNCATED_VALUE)
        if not _NUMBER.fullmatch(m.group()):
            raise _Refused(NOT_JSON)
        out.append(m.group())
        return m.end()
    for literal in _LITERALS:
        if text.startswith(literal, i):
            out.append(literal)
            return i + len(literal)
        if n - i < len(literal) and literal.startswith(text[i:]):
            raise _Refused(TRUNCATED_VALUE)
    raise _Refused(NOT_JSON)


# --- single records -------------------------------------------------------------------------------------------


def _decode(raw: bytes | str) -> str:
    """The record as text, refused before any work when it is too large, not UTF-8, or holds a NUL."""
    if isinstance(raw, bytes | bytearray | memoryview):
        if len(raw) > MAX_INPUT_BYTES:
            raise _Refused(TOO_LARGE)
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(NOT_TEXT) from None
    elif isinstance(raw, str):
        if len(raw) > MAX_INPUT_BYTES:  # characters never outnumber bytes: refuse before encoding
            raise _Refused(TOO_LARGE)
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates
            raise _Refused(NOT_TEXT) from None
        if size > MAX_INPUT_BYTES:
            raise _Refused(TOO_LARGE)
        text = raw
    else:
        raise _Refused(NOT_TEXT)
    if "\x00" in text:
        raise _Refused(NUL_BYTE)
    return text


def _check_depth(value: Any, text: str) -> None:
    """Refuse depths past MAX_DEPTH; a text with fewer brackets than that cannot hold one (no walk needed)."""
    if len(text) < MAX_DEPTH or text.count("{") + text.count("[") < MAX_DEPTH:
        return
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise _Refused(TOO_DEEPLY_NESTED)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))


def _load(text: str, control_characters: bool = False) -> Any:
    try:  # every text here passed _decode (or is one with ASCII edits): it encodes as UTF-8
        # refuses numbers numeric cannot hold while parsing
        value = jsonutil.loads(text, encodable=True, control_characters=control_characters, unique_keys=True)
    except jsonutil.DuplicateKeys:
        raise _Refused(DUPLICATE_KEYS) from None
    except jsonutil.NotStorableJSON:
        raise _Refused(NOT_STORABLE) from None
    except RecursionError:
        raise _Refused(TOO_DEEPLY_NESTED) from None
    _check_depth(value, text)
    return value


def _checked(value: Any, strategy: str, text: str | None) -> RepairResult:
    if not isinstance(value, dict):
        return _refused(NOT_AN_OBJECT)
    result = validate_event(value)
    if not result.valid:  # errors quote the bad values: keep the reason readable
        return _refused(f"{VALIDATION_FAILED}: {'; '.join(result.errors)}"[:_MAX_REASON])
    return RepairResult(value, strategy, None, text)


_COMMA_ERRORS = ("Expecting property name enclosed in double quotes", "Expecting value")
_ENDS_A_VALUE = ('"', "}", "]", "e", "l")  # a string, a bracket, true/false, null: never a number (may be cut)
_QUICK_STEPS = 4


def _quick_fix(text: str, error: ValueError, close: bool) -> tuple[str, bool, Any] | None:
    """The tokenizer's result for the faults most dead letters have, found where the parser stopped; else None.

    The parser reports its first error, so the text before it is valid: a comma it met right before a closer is a
    trailing comma (which the tokenizer drops), and, with ``close``, an object that ended after a complete value
    needs the one brace the tokenizer would add. Each fix is re-parsed; anything else (or more) goes to the
    tokenizer. Returns ``(fixed, closed, value)``.
    """
    closed = False
    for _ in range(_QUICK_STEPS):
        if not isinstance(error, json.JSONDecodeError):
            return None
        at, before = error.pos, text[: error.pos].rstrip(_BLANKS)
        if error.msg in _COMMA_ERRORS and text[at : at + 1] in ("}", "]") and before.endswith(","):
            text = before[:-1] + text[len(before) :]
        elif close and not closed and error.msg == "Expecting ',' delimiter" and at == len(text):
            if not before.endswith(_ENDS_A_VALUE):
                return None
            text, closed = text + "}", True
        else:
            return None
        try:
            return text, closed, _load(text)
        except _Refused:
            return None
        except ValueError as exc:
            error = exc
    return None


def _speculative_fix(text: str, close: bool) -> tuple[str, bool, Any] | None:
    """The two commonest faults fixed before any parse fails (one parse, not two); None when the guess is wrong.

    A text ending in ``,}`` is never JSON, and with that comma dropped it parses only if the comma was a trailing
    one after a value (a comma inside a string would leave that string open; one right after ``{`` is refused
    here); a text ending after a string, bracket or literal that parses once ``}`` is added was an object that
    lost exactly its closing brace. Either way the result is the one :func:`_quick_fix` (and the tokenizer) would
    reach after the first parse failed. Returns ``(fixed, closed, value)``.
    """
    body = text.rstrip(_BLANKS)
    if body.endswith("}"):
        inner = body[:-1].rstrip(_BLANKS)
        if not inner.endswith(",") or inner[:-1].rstrip(_BLANKS).endswith("{"):  # "{,}" is no trailing comma
            return None
        fixed, closed = inner[:-1] + text[len(inner) :], False
    elif close and body.endswith(_ENDS_A_VALUE):
        fixed, closed = text + "}", True
    else:
        return None
    try:
        return fixed, closed, _load(fixed)
    except (ValueError, _Refused):
        return None


def _cut_in_a_string(text: str, error: ValueError) -> bool:
    """The tokenizer's verdict (``truncated_value``) without its pass, where the parser's error proves it.

    The parser stops at its first fault, so everything before it is valid JSON the tokenizer copies unchanged; an
    unterminated string then runs to the end of the text with valid escapes and no raw control character (either
    would have stopped the parser first), which is exactly where the tokenizer refuses a value cut short. Only for
    an object (the tokenizer refuses anything else first) nested less deep than it refuses."""
    return (
        isinstance(error, json.JSONDecodeError)
        and error.msg == "Unterminated string starting at"
        and text.lstrip(_BLANKS).startswith("{")
        and text.count("{") + text.count("[") < MAX_DEPTH
    )


def _repair_text(text: str, *, close: bool) -> RepairResult:
    """One JSON value: as it is, with raw control characters as data, then the tokenizer's fixes."""
    try:
        try:
            fixed, strategy, closed = text, AS_IS, False
            if guessed := _speculative_fix(text, close):
                strategy = TOKENIZER_FIX
                fixed, closed, value = guessed
            else:
                value = _load(text)
        except ValueError as error:
            if str(error).startswith(_CONTROL_ERROR) and (value := _lenient(text)) is not None:
                strategy, fixed = CONTROL_CHARACTERS, None  # jsonb refuses the raw character: the writer renders
            elif _cut_in_a_string(text, error):
                return _refused(TRUNCATED_VALUE)
            else:
                strategy = TOKENIZER_FIX
                if quick := _quick_fix(text, error, close):
                    fixed, closed, value = quick
                else:
                    fixed, closed = _fix(text, close)
                    try:  # the tokenizer keeps raw control characters: they are the writer's data
                        value = _load(fixed, control_characters=True)
                    except ValueError:  # the tokenizer let through what the parser refuses: refuse, never raise
                        return _refused(NOT_JSON)
                    if _CONTROL.search(fixed):  # raw in a string (jsonb refuses it), or a blank: the writer
                        fixed = None  # renders the canonical form
    except _Refused as exc:
        return _refused(exc.reason)
    if closed > 1:  # a list or object inside the event was cut too: it may have lost elements, not only pairs
        return _refused(f"{TRUNCATED_VALUE}: a nested value is open")
    result = _checked(value, TRUNCATION_CLOSED if closed else strategy, fixed)
    if closed and result.event is not None and (absent := [k for k in _APPENDED_LAST if k not in value]):
        return _refused(f"{UNCLOSED}: lacks {', '.join(absent)}")
    return result


def _lenient(text: str) -> Any:
    """The value with raw control characters read as data, or None when the text has other faults."""
    try:
        return _load(text, control_characters=True)
    except ValueError:
        return None


def repair_record(raw: bytes | str) -> RepairResult:
    """Repair one dead letter's bytes, cheapest strategy first; never raises, never invents a key or value.

    ``as_is``: it already parses and validates (a transient failure). ``control_characters``: it parses once raw
    control characters in strings are taken as data. ``tokenizer_fix``: see :func:`tokenizer_fix`;
    ``truncation_closed`` when that closed brackets. ``split``: several complete values, each repaired on its
    own. ``python_literal``: a dict written as Python's repr. ``bom_skipped``: a byte-order mark before a whole
    record. A result that does not validate against Cowrie's catalogue is refused.
    """
    try:
        text = _decode(raw)
    except _Refused as exc:
        return _refused(exc.reason)
    at = 0
    if text.startswith(_BOM):  # an encoding mark, not data: the event starts after it, as a reader would see it
        text, at = text[1:], len(_BOM.encode("utf-8"))
    result = _repair_text(text, close=True)
    if result.event is None and result.reason == TRAILING_DATA:
        result = _split(text)
    elif result.event is None and result.reason == NOT_JSON:
        result = _python_literal(text) or result
    if at:
        if result.event is None:
            return result
        strategy = BOM_SKIPPED if result.strategy == AS_IS else result.strategy
        more = tuple(part._replace(at=part.at + at) for part in result.more)
        return result._replace(strategy=strategy, at=result.at + at, more=more)
    return result


# --- several values in one record -----------------------------------------------------------------------------


def _value_end(text: str, i: int) -> int | None:
    """The index after the bracketed value opening at ``text[i]``, or None when it never closes."""
    depth, in_string, n = 0, False, len(text)
    while True:
        m = (_LEX_INSIDE if in_string else _LEX_OUTSIDE).search(text, i)
        if m is None:
            return None
        c, i = m.group(), m.end()
        if c == "\\":
            i += 1
        elif c == '"':
            in_string = not in_string
        elif c in "{[":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return i
        if i > n:
            return None


def _split(text: str) -> RepairResult:
    """Values written one after another on one record (a lost newline, two writers, a restart): one event each.

    Only blanks may lie between them, and every value must repair on its own (never by closing brackets: a cut
    one is refused with the others, since the record would then be resolved with part of it lost).
    """
    spans, i, n = [], _WS.match(text).end(), len(text)
    while i < n:
        if text[i] not in "{[" or (end := _value_end(text, i)) is None:
            return _refused(TRAILING_DATA)
        spans.append((i, end))
        i = _WS.match(text, end).end()
    parts = []
    for k, (start, end) in enumerate(spans):
        part = _repair_text(text[start:end], close=False)
        if part.event is None:
            return _refused(f"{TRAILING_DATA}: value {k + 1} of {len(spans)}: {part.reason}"[:_MAX_REASON])
        parts.append(part._replace(strategy=SPLIT, at=len(text[:start].encode("utf-8"))))
    return parts[0]._replace(more=tuple(parts[1:]))


# --- Python literals ------------------------------------------------------------------------------------------


def _python_literal(text: str) -> RepairResult | None:
    """A dict written as Python's ``repr`` (a producer that logged ``str(event)``), read without evaluating it.

    The text must be exactly what ``repr`` writes for the value read from it (Python 3's, or Python 2's with
    ``u''`` strings): dicts with string keys, lists, strings, numbers, True, False and None, ``, `` and ``: ``
    between them, nothing else. So a comment, a string written twice over (``'a' 'b'``), a ``\\x41`` repr would
    have printed as ``A``, Python 2 byte strings (``'\\xc3\\xa9'``: a guess at their encoding), a duplicate key
    (repr would show one) or odd spacing refuse the record. Numbers keep their digits. None when the text is no
    such literal: the JSON reason stands.
    """
    body = text.strip(_BLANKS)
    if not body.startswith("{") or "\n" in body:  # repr escapes every newline: one line
        return None
    try:
        with warnings.catch_warnings():  # an invalid escape ("\\]") is no repr's output: an error, not a warning
            warnings.simplefilter("error")
            tree = ast.parse(body, mode="eval")
        source = body.encode("utf-8")
        rendered, value = _from_python(tree.body, source)
        if rendered != body:
            return None
        canonical = jsonutil.canonical_json(value)
        value = jsonutil.loads(canonical)  # what jsonb would store: refuses NUL characters and lone surrogates
    except (SyntaxError, Warning, ValueError, RecursionError, MemoryError, UnicodeEncodeError, _Refused):
        return None  # NotStorableJSON is a ValueError
    return _checked(value, PYTHON_LITERAL, canonical)


def _from_python(node: ast.expr, source: bytes) -> tuple[str, Any]:
    """``(what repr writes for the node's value, its JSON value)``; strings keep the form they were written in
    when it is one a repr writes for them."""
    if isinstance(node, ast.Dict):
        parts, value = [], {}
        for key, item in zip(node.keys, node.values, strict=True):
            if not (isinstance(key, ast.Constant) and type(key.value) is str):
                raise _Refused("a key that is not a string")
            key_text, name = _from_python(key, source)
            if name in value:  # no repr writes a key twice: the writer's dict was not this
                raise _Refused("a key written twice")
            item_text, value[name] = _from_python(item, source)
            parts.append(f"{key_text}: {item_text}")
        return "{" + ", ".join(parts) + "}", value
    if isinstance(node, ast.List):
        items = [_from_python(item, source) for item in node.elts]
        return "[" + ", ".join(text for text, _ in items) + "]", [value for _, value in items]
    sign = ""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        sign, node = "-", node.operand
    if isinstance(node, ast.Constant):
        constant = node.value
        kind = type(constant)
        if not sign and (constant is None or kind is bool):
            return repr(constant), constant
        if not sign and kind is str:
            written = source[node.col_offset : node.end_col_offset].decode("utf-8")
            if written not in (repr(constant), _python2_repr(constant)):
                raise _Refused("a string no repr writes so")
            return written, constant
        if kind in (int, float):
            digits = repr(constant)
            if not _NUMBER.fullmatch(digits):  # inf, nan: no JSON number says that
                raise _Refused(f"number {digits[:40]!r}")
            try:
                return sign + digits, jsonutil.storable_number(sign + digits)
            except jsonutil.NotStorableJSON:
                raise _Refused(NOT_STORABLE) from None
    raise _Refused(f"{type(node).__name__} is no JSON value")


def _python2_repr(value: str) -> str:
    """Python 2's repr of a unicode string: ``u'...'``, printable ASCII as it is, the rest escaped."""
    quote = '"' if "'" in value and '"' not in value else "'"
    out = ["u", quote]
    for char in value:
        code = ord(char)
        if char in ("\\", quote):
            out.append("\\" + char)
        elif char in "\t\n\r":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r"}[char])
        elif 32 <= code < 127:
            out.append(char)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append(quote)
    return "".join(out)


# --- stitching ------------------------------------------------------------------------------------------------

_OPEN, _CLOSED, _BROKEN = range(3)
_LEX_OUTSIDE = re.compile(r'["{}\[\]]')
_LEX_INSIDE = re.compile(r'["\\]')


class _Lexer:
    """String state and depth over pieces fed in order: where each join falls and where the record ends."""

    def __init__(self) -> None:
        self.in_string = False
        self.escaped = False  # the last piece ended with a backslash inside a string
        self.depth = 0

    def feed(self, text: str) -> int:
        i, n = int(self.escaped), len(text)  # an escape split across pieces takes this piece's first character
        self.escaped = False
        while True:
            m = (_LEX_INSIDE if self.in_string else _LEX_OUTSIDE).search(text, i)
            if m is None:
                return _OPEN
            c = m.group()
            if c == "\\":
                if m.end() == n:
                    self.escaped = True
                    return _OPEN
                i = m.end() + 1
                continue
            if c == '"':
                self.in_string = not self.in_string
            elif c in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth <= 0:
                    whole = self.depth == 0 and not text[m.end() :].strip(_BLANKS)
                    return _CLOSED if whole else _BROKEN
            i = m.end()


def _fragment_text(raw: bytes) -> str | None:
    try:
        return _decode(raw)
    except _Refused:
        return None


def _gap(before: Fragment, after: Fragment) -> int:
    """Bytes between two fragments of one file: 1 or 2 (its newline) when ``after`` is the next record."""
    return after.offset - before.offset - len(before.raw)


def _group(ordered: Sequence[Fragment], texts: list[str | None], start: int) -> tuple[int, RepairResult] | None:
    """The shortest group from ``start`` that closes its object, if it validates: (size, its repair)."""
    if start + 1 == len(ordered) or _gap(ordered[start], ordered[start + 1]) not in (1, 2):
        return None  # a group has two fragments at least: an isolated one is not read at all
    lexer, pieces, size = _Lexer(), [], 0
    for k in range(start, min(start + MAX_GROUP, len(ordered))):
        text = texts[k]
        if not text:
            return None
        if k > start:
            gap = _gap(ordered[k - 1], ordered[k])
            if gap not in (1, 2):  # "\n" or "\r\n" between them, nothing else
                return None
            if lexer.in_string and gap != 1:  # inside a string the bytes between are data: only "\n" is certain
                return None
            pieces.append("\n")  # a newline inside a string (the writer's), or blanks between tokens
        size += len(ordered[k].raw)
        if size > MAX_INPUT_BYTES:
            return None
        pieces.append(text)
        state = lexer.feed(text)
        if state == _OPEN:
            continue
        if state == _BROKEN or k == start:  # a whole record on its own is repair_record's business
            return None
        result = _repair_text("".join(pieces), close=False)
        return (k - start + 1, result) if result.event is not None else None
    return None


def stitch_fragments(fragments: Sequence[Fragment]) -> list[Stitched]:
    """Rebuild events cut across consecutive dead letters of ONE source (any order in, offset order out).

    A group is contiguous (each fragment starts right after the previous one and its newline), starts with a
    ``{`` and ends where that object closes. Joins put back the newline the reader split at: between tokens it is
    a blank, inside a string it is the writer's unescaped newline, kept as data (a join inside a string is taken
    only when the gap is exactly that one byte). The joined text must validate with at most trailing-comma and
    escape fixes: never closing brackets, since a group that needs closing was not whole. Shortest groups win;
    each fragment is used at most once.
    """
    ordered = sorted(fragments, key=lambda f: f.offset)
    texts = [_fragment_text(f.raw) for f in ordered]
    candidates = []
    for start, text in enumerate(texts):
        if text is not None and text.lstrip(_BLANKS).startswith("{") and (found := _group(ordered, texts, start)):
            candidates.append((found[0], start, found[1]))
    used: set[int] = set()
    chosen = []
    for size, start, result in sorted(candidates, key=lambda c: (c[0], c[1])):
        members = range(start, start + size)
        if used.isdisjoint(members):
            used.update(members)
            keys = tuple(ordered[k].key for k in members)
            chosen.append((start, Stitched(keys, result.event, text=result.text)))
    return [stitched for _, stitched in sorted(chosen, key=lambda c: c[0])]
