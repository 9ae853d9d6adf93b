"""Repair dead letters without inventing data: a repaired event holds only what its bytes held.

The old repairer filled missing usernames with "unknown", stamped missing timestamps with the repair time and
invented a ``cowrie.system.info`` event id. Here a repair may only drop trailing commas, re-escape stray
backslashes, close brackets after a complete value, or join the fragments of one record; the result must pass
Cowrie's catalogue (:func:`validate_event`) or it is refused, with the reason why.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dlq_assets import jsonutil
from dlq_assets.cowrie import validate_event

__all__ = [
    "MAX_GROUP",
    "MAX_INPUT_BYTES",
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
TOO_DEEPLY_NESTED = "too_deeply_nested"
VALIDATION_FAILED = "validation_failed"
# Refused before parsing: such a record is no piece of a stitched one either (a split at a newline leaves each line
# valid UTF-8 if the record was, and a group through a fragment that does not decode is refused).
UNSTITCHABLE = frozenset({TOO_LARGE, NOT_TEXT, NUL_BYTE})

_BLANKS = " \t\r\n"
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


def _fix(text: str, close: bool) -> tuple[str, bool]:
    """The fixed text, and whether brackets had to be closed."""
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
    return "".join(out), True


def _string(text: str, i: int, out: list[str]) -> int:
    """Copy the string opening at ``text[i]``, fixing stray backslashes; the index after its closing quote."""
    n = len(text)
    out.append('"')
    i += 1
    while True:
        j = _STRING_BODY.match(text, i).end()
        out.append(text[i:j])
        if j == n:
            raise _Refused(TRUNCATED_VALUE)
        if text[j] == '"':
            out.append('"')
            return j + 1
        if text[j] != "\\":  # a raw control character: not JSON, and no escape of ours would be the writer's
            raise _Refused(CONTROL_CHARACTER)
        if j + 1 == n:
            raise _Refused(TRUNCATED_VALUE)
        if text[j + 1] in _SIMPLE_ESCAPES:
            out.append(text[j : j + 2])
            i = j + 2
        elif text[j + 1] == "u" and _HEX4.match(text, j + 2):
            out.append(text[j : j + 6])
            i = j + 6
        else:  # a literal backslash the writer did not escape (C:\Users, \x41): escape it
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


def _load(text: str) -> Any:
    try:  # every text here passed _decode (or is one with ASCII edits): it encodes as UTF-8
        value = jsonutil.loads(text, encodable=True)  # refuses numbers numeric cannot hold while parsing
    except jsonutil.NotStorableJSON:
        raise _Refused(NOT_STORABLE) from None
    except RecursionError:
        raise _Refused(TOO_DEEPLY_NESTED) from None
    _check_depth(value, text)
    return value


def _checked(value: Any, strategy: str, text: str) -> RepairResult:
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


def _repair_text(text: str, *, close: bool) -> RepairResult:
    try:
        try:
            fixed, strategy, closed = text, AS_IS, False
            if guessed := _speculative_fix(text, close):
                strategy = TOKENIZER_FIX
                fixed, closed, value = guessed
            else:
                value = _load(text)
        except ValueError as error:
            strategy = TOKENIZER_FIX
            if quick := _quick_fix(text, error, close):
                fixed, closed, value = quick
            else:
                fixed, closed = _fix(text, close)
                try:
                    value = _load(fixed)
                except ValueError:  # the tokenizer let through what the parser refuses: refuse, never raise
                    return _refused(NOT_JSON)
    except _Refused as exc:
        return _refused(exc.reason)
    result = _checked(value, strategy, fixed)
    if closed and result.event is not None and (absent := [k for k in _APPENDED_LAST if k not in value]):
        return _refused(f"{UNCLOSED}: lacks {', '.join(absent)}")
    return result


def repair_record(raw: bytes | str) -> RepairResult:
    """Repair one dead letter's bytes, cheapest strategy first; never raises, never invents a key or value.

    ``as_is``: it already parses and validates (a transient failure). ``tokenizer_fix``: see
    :func:`tokenizer_fix`. A result that does not validate against Cowrie's catalogue is refused.
    """
    try:
        text = _decode(raw)
    except _Refused as exc:
        return _refused(exc.reason)
    return _repair_text(text, close=True)


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


def _group(ordered: Sequence[Fragment], texts: list[str | None], start: int) -> tuple[int, RepairResult] | None:
    """The shortest group from ``start`` that closes its object, if it validates: (size, its repair)."""
    lexer, pieces, size = _Lexer(), [], 0
    for k in range(start, min(start + MAX_GROUP, len(ordered))):
        text = texts[k]
        if not text:
            return None
        if k > start:
            before = ordered[k - 1]
            gap = ordered[k].offset - before.offset - len(before.raw)
            if gap not in (1, 2):  # "\n" or "\r\n" between them, nothing else
                return None
            if not lexer.in_string:
                pieces.append("\n")  # whitespace between tokens (a pretty-printed object)
            elif gap != 1:  # a split inside a string, but the gap may have held a blank the reader stripped
                return None
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
    ``{`` and ends where that object closes. Joins keep the newline where it falls between tokens and drop it
    where it falls inside a string (a JSON string cannot hold one, so it can only be a split). The joined text
    must validate with at most trailing-comma and escape fixes: never closing brackets, since a group that
    needs closing was not whole. Shortest groups win; each fragment is used at most once.
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
