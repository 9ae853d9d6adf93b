"""Split a Cowrie JSON log into records by bracket depth and string state, not by line.

Cowrie writes one object per line, but real logs also hold pretty-printed objects, truncated records and
binary junk. Line-based readers turn a pretty-printed object into a dozen dead letters (and bare strings into
"events"); this reader keeps every record whole, never drops a byte, and says why a record is unusable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator, Iterator
from typing import Any, BinaryIO, NamedTuple

from dlq_assets.core import jsonutil

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
_BOM = b"\xef\xbb\xbf"
_LINE_BLANKS = b" \t"
_QUOTE, _BACKSLASH, _NL, _BRACE = b'"'[0], b"\\"[0], b"\n"[0], b"{"[0]

# What a scan hands back: (end of the record in the buffer, truncated, too deep).
_Scan = Generator["Record", None, tuple[int, bool, bool]]


class Record(NamedTuple):
    """One record of the log: its exact bytes and where they are, plus the parsed value or why there is none.
    (A named tuple: a hundred thousand are made a second, and a frozen dataclass costs a microsecond each.)"""

    offset: int
    raw: bytes
    value: Any = None
    error: str | None = None
    bom: bool = False  # a UTF-8 byte-order mark stood right before the record and was skipped (not data)
    duplicate_keys: bool = False  # an object in it holds a key twice: ``value`` keeps the last, as jsonb does

    @property
    def ok(self) -> bool:
        return self.error is None


def _classify(raw: bytes, truncated: bool, too_deep: bool) -> tuple[Any, str | None, bool]:
    """``(value, error, duplicate_keys)``: byte-level faults first (they explain the rest), then structure, then
    what jsonb would say."""
    if b"\x00" in raw:
        return None, NUL_BYTE, False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, INVALID_UTF8, False
    if too_deep:  # checked before parsing: json.loads would recurse on it
        return None, TOO_DEEPLY_NESTED, False
    if truncated:
        return None, TRUNCATED, False
    duplicate_keys = False
    try:
        try:
            return jsonutil.loads(text, encodable=True, unique_keys=True), None, False
        except jsonutil.DuplicateKeys:  # rare: parsed again for the value jsonb keeps, or a fault further on
            duplicate_keys = True
            return jsonutil.loads(text, encodable=True), None, True
    except jsonutil.NotStorableJSON:
        return None, NOT_STORABLE_JSON, duplicate_keys
    except RecursionError:  # only if the caller set max_depth above what the parser can take
        return None, TOO_DEEPLY_NESTED, duplicate_keys
    except ValueError:
        return None, JSON_PARSE_ERROR, duplicate_keys


class _Scanner:
    """Resumable scanner; ``buf`` always starts at the first byte of the record being read (or of unread data)."""

    def __init__(self, stream: BinaryIO, max_record_bytes: int, max_depth: int, chunk_size: int) -> None:
        if max_record_bytes < 1 or chunk_size < 1 or max_depth < 1:
            raise ValueError("max_record_bytes, max_depth and chunk_size must be positive")
        self.stream, self.cap, self.max_depth, self.chunk_size = stream, max_record_bytes, max_depth, chunk_size
        self.buf = bytearray()
        self.base = 0  # absolute offset of buf[0]
        self.oversized = False
        self.keep_blanks = False  # the record was cut inside a string: its trailing blanks are data
        self.bom = False  # a byte-order mark stood before the record being read
        self.blank_until = 0  # absolute offset up to which the bytes past the cap are known blank

    def records(self) -> Iterator[Record]:
        buf = self.buf
        boms: list[int] = []  # offsets of the marks skipped since the last record
        while True:
            m = _NON_WS.search(buf)
            if m is None:  # whitespace between records is dropped as it is read: memory stays bounded
                self.base += len(buf)
                buf.clear()
                if not self._fill():  # a mark no record follows is kept as a record: no byte goes unaccounted
                    for offset in boms:
                        yield from self._lone_mark(offset)
                    return
                continue
            del buf[: m.start()]
            self.base += m.start()
            if buf[0] == _BOM[0] and len(buf) < len(_BOM) and self._fill():
                continue  # a BOM may straddle two chunks: look again with more bytes
            if buf.startswith(_BOM):  # an encoding mark, not data: skipped and flagged on the next record
                boms.append(self.base)
                del buf[: len(_BOM)]
                self.base += len(_BOM)
                continue
            self.bom = bool(boms)  # flags the record's first piece
            boms.clear()
            self.oversized = self.keep_blanks = False
            if buf[0] == _BRACE and (record := self._whole_line()) is not None:
                yield record
                continue
            if buf[0] in _OPEN:
                end, truncated, too_deep = yield from self._bracketed()
            else:  # garbage, or a stray closing bracket: the record is the rest of the line
                end, truncated, too_deep = (yield from self._to_line_end(0)), False, False
            stop = end  # the record without its trailing blanks, unless they are data
            while stop > 0 and buf[stop - 1] in _WS and not self.keep_blanks:
                stop -= 1
            while stop > self.cap or end >= 2 * self.cap:  # as ``_more`` cuts them
                yield self._piece(self.cap)
                end, stop = end - self.cap, max(stop - self.cap, 0)
            raw = bytes(buf[:stop])
            if not self.oversized:
                value, error, duplicate_keys = _classify(raw, truncated=truncated, too_deep=too_deep)
                yield Record(self.base, raw, value, error, self.bom, duplicate_keys)
            elif raw:  # else only blanks trailed its last piece: dropped, like any between records
                yield Record(self.base, raw, error=RECORD_TOO_LARGE, bom=self.bom)
            del buf[:stop]
            self.base += stop

    def _whole_line(self) -> Record | None:
        """The record when the buffered line from here is one JSON object as it stands (most records are), found
        with one parse instead of the bracket scan: the scan ends such a record where the line's blanks begin too.
        None sends the record to the scan: no newline buffered, too large or too deep for it, or not that object."""
        buf = self.buf
        end = buf.find(b"\n")
        if end < 0:
            return None
        stop = end
        while buf[stop - 1] in _WS:
            stop -= 1
        if stop > self.cap:
            return None
        raw = bytes(buf[:stop])
        if raw.count(b"{") + raw.count(b"[") > self.max_depth:  # nesting can go no deeper than its brackets
            return None
        try:
            value = jsonutil.loads(raw.decode("utf-8"), encodable=True, unique_keys=True)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, a key twice, not storable: the scan says which
            return None
        record = Record(self.base, raw, value, bom=self.bom)
        del buf[:end]  # the newline stays, read as the blank before the next record
        self.base += end
        return record

    def _lone_mark(self, offset: int) -> Iterator[Record]:
        if len(_BOM) <= self.cap:
            yield Record(offset, _BOM, error=_classify(_BOM, truncated=False, too_deep=False)[1])
        else:
            for start in range(0, len(_BOM), self.cap):
                yield Record(offset + start, _BOM[start : start + self.cap], error=RECORD_TOO_LARGE)

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
        record = Record(self.base, raw, error=RECORD_TOO_LARGE, bom=self.bom)
        self.bom = False
        self.base += size
        self.oversized = True
        return record

    def _more(self, all_in_record: bool = True) -> Generator[Record, None, tuple[int, bool]]:
        """Read on; return (bytes dropped from the buffer's front, whether anything was read).

        A full-size piece is emitted as soon as the record is surely too large: a non-blank byte lies past the cap,
        or (when every buffered byte is known to be in the record) the record runs a cap of blanks past it, which
        is cut like a longer record rather than held to learn whether the blanks trail it (``records`` cuts the
        same pieces when it meets the record's end first, so chunking never changes them).
        """
        dropped, buf, cap = 0, self.buf, self.cap
        while len(buf) > cap:
            # Blanks past the cap are scanned once (``blank_until``): a record holding a long run of them would
            # otherwise be scanned again at every fill, in time growing with the square of the run.
            if _NON_WS.search(buf, max(cap, self.blank_until - self.base)) is None:
                self.blank_until = self.base + len(buf)
                if not (all_in_record and len(buf) >= 2 * cap):
                    break
            yield self._piece(cap)
            dropped += cap
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
                # A raw newline inside a string is a producer's unescaped newline (data) unless the next line
                # opens a record: then the string was cut there. Outside strings a column-0 "{" opens the next one.
                # A byte-order mark there (a file with one appended to the log) comes before that "{".
                j = i + 1
                while True:
                    while j < len(buf) and in_string and buf[j] in _LINE_BLANKS:
                        j += 1
                    if j < len(buf) and not (buf[j] == _BOM[0] and len(buf) - j < len(_BOM)):
                        break
                    dropped, more = yield from self._more(all_in_record=False)  # blanks after the newline
                    i, j = i - dropped, j - dropped
                    if not more:
                        if j < len(buf):
                            break
                        return len(buf), True, too_deep
                if buf.startswith(_BOM, j) and (j + len(_BOM) < len(buf) or self._fill()):
                    j += len(_BOM)
                if buf[j] == _BRACE:
                    if in_string:
                        self.keep_blanks = True
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
        """The record ends at its closing bracket when its line ends or the next value begins on it (a bracket,
        or a byte-order mark before one); otherwise it takes the whole line."""
        buf, i = self.buf, close
        while True:
            m = _NOT_LINE_BLANK.search(buf, i)
            if m is None:
                i = len(buf)
                dropped, more = yield from self._more(all_in_record=False)  # blanks after the close
                i -= dropped
                close -= dropped
                if not more:
                    return close
            elif buf[m.start()] == _BOM[0] and len(buf) - m.start() < len(_BOM) and self._fill():
                i = m.start()  # a mark cut by the chunk boundary: look again with its other bytes
            else:
                break
        at = m.start()
        if buf[at] == _NL:
            return close
        # Another value begins on the line: a record of its own, if this one is JSON. A text that is not (a Python
        # repr, whose quotes this scanner does not track) may have closed a bracket inside one of its strings.
        # A record over the size cap is never JSON, however much of it the buffer still holds.
        if (
            (buf[at] in _OPEN or buf.startswith(_BOM, at))
            and not self.oversized
            and close <= self.cap
            and _classify(bytes(buf[:close]), False, False)[1] is None
        ):
            return close
        return (yield from self._to_line_end(at))


_CUT_SPLIT_ERRORS = (TRUNCATED, JSON_PARSE_ERROR)
_MAX_SPLIT_TRIES = 64


def split_after_cut(
    record: Record, accept: Callable[[Any], bool], is_cut: Callable[[bytes], bool] = lambda head: True
) -> tuple[Record, Record] | None:
    """A failed record that is a cut record followed on its line by a whole one (a writer restarted mid-line,
    another writer's line appended to a cut one): the cut part and the whole one, each at its exact offset.

    The whole one is the first ``{"`` from which the rest of the record parses as one object that ``accept``
    takes (a valid event), where ``is_cut`` takes the bytes before it for a record cut short: the caller says
    what a cut record is (JSON cut where no value is due: one cut after ``:`` may hold the rest as a nested value
    whose closing brackets are missing, and text that is not JSON, such as a Python repr, may hold it in a
    string). Anything else stays one record.
    """
    if record.error not in _CUT_SPLIT_ERRORS:
        return None
    raw = record.raw
    at = raw.find(b'{"', 1)
    for _ in range(_MAX_SPLIT_TRIES):
        if at < 0:
            return None
        value, error, duplicate_keys = _classify(raw[at:], truncated=False, too_deep=False)
        if error is None and isinstance(value, dict) and accept(value) and is_cut(raw[:at]):
            value_head, error_head, _ = _classify(raw[:at], truncated=True, too_deep=False)
            head = Record(record.offset, raw[:at], value_head, error_head, record.bom)
            return head, Record(record.offset + at, raw[at:], value, duplicate_keys=duplicate_keys)
        at = raw.find(b'{"', at + 1)
    return None


def read_records(
    stream: BinaryIO,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    accept: Callable[[Any], bool] | None = None,
    is_cut: Callable[[bytes], bool] = lambda head: True,
) -> Iterator[Record]:
    """Yield every record of a binary stream in order, reading it in ``chunk_size`` pieces.

    Memory stays within ``max_record_bytes`` plus one chunk whatever the file size: longer records come out
    as consecutive ``record_too_large`` pieces. With ``accept`` (what a whole record is), a failed record that
    holds a cut record (``is_cut``) and a whole one comes out as the two (see :func:`split_after_cut`).
    """
    records = _Scanner(stream, max_record_bytes, max_depth, chunk_size).records()
    if accept is None:
        return records
    return _with_cuts_split(records, accept, is_cut)


def _with_cuts_split(
    records: Iterator[Record], accept: Callable[[Any], bool], is_cut: Callable[[bytes], bool]
) -> Iterator[Record]:
    for record in records:
        if record.ok or (parts := split_after_cut(record, accept, is_cut)) is None:
            yield record
        else:
            yield from parts


def read_file(
    path: str | os.PathLike[str],
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    accept: Callable[[Any], bool] | None = None,
    is_cut: Callable[[bytes], bool] = lambda head: True,
) -> Iterator[Record]:
    """Stream the records of a file opened in binary mode (the file closes when the iterator is exhausted)."""
    options = {"max_record_bytes": max_record_bytes, "max_depth": max_depth, "chunk_size": chunk_size}
    with open(path, "rb") as stream:
        yield from read_records(stream, **options, accept=accept, is_cut=is_cut)


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
    "split_after_cut",
]
