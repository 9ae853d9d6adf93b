"""Split a Cowrie JSON log into records by bracket depth and string state, not by line.

Cowrie writes one object per line, but real logs also hold pretty-printed objects, truncated records and
binary junk. Line-based readers turn a pretty-printed object into a dozen dead letters (and bare strings into
"events"); this reader keeps every record whole, never drops a byte, and says why a record is unusable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from dlq_assets import jsonutil

JSON_PARSE_ERROR = "json_parse_error"
NOT_STORABLE_JSON = "not_storable_json"
INVALID_UTF8 = "invalid_utf8"
NUL_BYTE = "nul_byte"
TRUNCATED = "truncated"
TOO_DEEPLY_NESTED = "too_deeply_nested"
RECORD_TOO_LARGE = "record_too_large"

DEFAULT_MAX_RECORD_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_DEPTH = 512
DEFAULT_CHUNK_SIZE = 64 * 1024

_WS = b" \t\r\n"
_NON_WS = re.compile(rb"[^ \t\r\n]")
_NOT_LINE_BLANK = re.compile(rb"[^ \t\r]")  # ends the blank tail of a line: a newline or anything else
_NEWLINE = re.compile(rb"\n")
# A whole string in one match where it is complete in the buffer, else the next structural byte.
_OUTSIDE_STRING = re.compile(rb'"[^"\\\n]*(?:\\[^\n][^"\\\n]*)*"|[][{}"\n]')
_INSIDE_STRING = re.compile(rb'["\\\n]')
_OPEN = b"{["
_QUOTE, _BACKSLASH, _NL, _BRACE = b'"'[0], b"\\"[0], b"\n"[0], b"{"[0]

# What a scan hands back: (end of the record in the buffer, truncated, too deep).
_Scan = Generator["Record", None, tuple[int, bool, bool]]


@dataclass(frozen=True)
class Record:
    """One record of the log: its exact bytes and where they are, plus the parsed value or why there is none."""

    offset: int
    raw: bytes
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _classify(raw: bytes, *, truncated: bool, too_deep: bool) -> tuple[Any, str | None]:
    """Byte-level faults first (they explain the rest), then structure, then what jsonb would say."""
    if b"\x00" in raw:
        return None, NUL_BYTE
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, INVALID_UTF8
    if too_deep:  # checked before parsing: json.loads would recurse on it
        return None, TOO_DEEPLY_NESTED
    if truncated:
        return None, TRUNCATED
    try:
        return jsonutil.loads(text), None
    except jsonutil.NotStorableJSON:
        return None, NOT_STORABLE_JSON
    except RecursionError:  # only if the caller set max_depth above what the parser can take
        return None, TOO_DEEPLY_NESTED
    except ValueError:
        return None, JSON_PARSE_ERROR


class _Scanner:
    """Resumable scanner; ``buf`` always starts at the first byte of the record being read (or of unread data)."""

    def __init__(self, stream: BinaryIO, max_record_bytes: int, max_depth: int, chunk_size: int) -> None:
        if max_record_bytes < 1 or chunk_size < 1 or max_depth < 1:
            raise ValueError("max_record_bytes, max_depth and chunk_size must be positive")
        self.stream, self.cap, self.max_depth, self.chunk_size = stream, max_record_bytes, max_depth, chunk_size
        self.buf = bytearray()
        self.base = 0  # absolute offset of buf[0]
        self.oversized = False

    def records(self) -> Iterator[Record]:
        buf = self.buf
        while True:
            m = _NON_WS.search(buf)
            if m is None:  # whitespace between records is dropped as it is read: memory stays bounded
                self.base += len(buf)
                buf.clear()
                if not self._fill():
                    return
                continue
            del buf[: m.start()]
            self.base += m.start()
            self.oversized = False
            if buf[0] in _OPEN:
                end, truncated, too_deep = yield from self._bracketed()
            else:  # garbage, or a stray closing bracket: the record is the rest of the line
                end, truncated, too_deep = (yield from self._to_line_end(0)), False, False
            while end > 0 and buf[end - 1] in _WS:
                end -= 1
            while end > self.cap:
                yield self._piece(self.cap)
                end -= self.cap
            raw = bytes(buf[:end])
            if self.oversized:
                yield Record(self.base, raw, error=RECORD_TOO_LARGE)
            else:
                value, error = _classify(raw, truncated=truncated, too_deep=too_deep)
                yield Record(self.base, raw, value, error)
            del buf[:end]
            self.base += end

    def _fill(self) -> bool:
        chunk = self.stream.read(self.chunk_size)
        if not chunk:
            return False
        self.buf.extend(chunk)
        return True

    def _piece(self, size: int) -> Record:
        """Cut the first ``size`` bytes off an oversized record so the buffer never outgrows the cap."""
        raw = bytes(self.buf[:size])
        del self.buf[:size]
        record = Record(self.base, raw, error=RECORD_TOO_LARGE)
        self.base += size
        self.oversized = True
        return record

    def _more(self) -> Generator[Record, None, tuple[int, bool]]:
        """Read on; return (bytes dropped from the buffer's front, whether anything was read).

        Only called once every buffered byte is known to be in the current record, so a full-size piece can be
        emitted as soon as a non-blank byte lies past the cap (the record is then surely too large).
        """
        dropped = 0
        while len(self.buf) > self.cap and _NON_WS.search(self.buf, self.cap):
            yield self._piece(self.cap)
            dropped += self.cap
        return dropped, self._fill()

    def _to_line_end(self, i: int) -> Generator[Record, None, int]:
        buf = self.buf
        while (m := _NEWLINE.search(buf, i)) is None:
            i = len(buf)
            dropped, more = yield from self._more()
            i -= dropped
            if not more:
                return len(buf)
        return m.start()

    def _bracketed(self) -> _Scan:
        """Track depth and string state until the brackets close, or a rule says the record was cut."""
        buf, max_depth = self.buf, self.max_depth
        i, depth, in_string, too_deep = 0, 0, False, False
        while True:
            m = (_INSIDE_STRING if in_string else _OUTSIDE_STRING).search(buf, i)
            if m is None:
                i = len(buf)
                dropped, more = yield from self._more()
                i -= dropped
                if not more:
                    return len(buf), True, too_deep
                continue
            i = m.start()
            c = buf[i]
            if c == _QUOTE:
                if m.end() - i > 1:  # a complete string
                    i = m.end()
                    continue
                in_string = not in_string
                i += 1
            elif c == _BACKSLASH:  # only found inside strings; never let it swallow a raw newline
                if i + 1 == len(buf):
                    dropped, more = yield from self._more()
                    i -= dropped
                    if not more:
                        return len(buf), True, too_deep
                    continue
                i += 1 if buf[i + 1] == _NL else 2
            elif c == _NL:
                if in_string:  # JSON strings cannot hold a raw newline: the record was split here
                    return i, True, too_deep
                if i + 1 == len(buf):
                    dropped, more = yield from self._more()
                    i -= dropped
                    if not more:
                        return len(buf), True, too_deep
                    continue
                if buf[i + 1] == _BRACE:  # a column-0 "{" is the next top-level event
                    return i, True, too_deep
                i += 1
            elif c in _OPEN:
                depth += 1
                too_deep = too_deep or depth > max_depth
                i += 1
            else:
                depth -= 1
                i += 1
                if depth == 0:
                    return (yield from self._after_close(i)), False, too_deep

    def _after_close(self, close: int) -> Generator[Record, None, int]:
        """The record ends at its closing bracket unless the line goes on; then it takes the whole line."""
        buf, i = self.buf, close
        while (m := _NOT_LINE_BLANK.search(buf, i)) is None:
            i = len(buf)
            dropped, more = yield from self._more()
            i -= dropped
            close -= dropped
            if not more:
                return close
        if buf[m.start()] == _NL:
            return close
        return (yield from self._to_line_end(m.start()))


def read_records(
    stream: BinaryIO,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[Record]:
    """Yield every record of a binary stream in order, reading it in ``chunk_size`` pieces.

    Memory stays within ``max_record_bytes`` plus one chunk whatever the file size: longer records come out
    as consecutive ``record_too_large`` pieces.
    """
    return _Scanner(stream, max_record_bytes, max_depth, chunk_size).records()


def read_file(
    path: str | os.PathLike[str],
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[Record]:
    """Stream the records of a file opened in binary mode (the file closes when the iterator is exhausted)."""
    with open(path, "rb") as stream:
        yield from read_records(stream, max_record_bytes=max_record_bytes, max_depth=max_depth, chunk_size=chunk_size)


__all__ = [
    "INVALID_UTF8",
    "JSON_PARSE_ERROR",
    "NOT_STORABLE_JSON",
    "NUL_BYTE",
    "RECORD_TOO_LARGE",
    "TOO_DEEPLY_NESTED",
    "TRUNCATED",
    "Record",
    "read_file",
    "read_records",
]
