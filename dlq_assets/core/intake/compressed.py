"""Open a log by its magic bytes (gzip, bzip2, xz, zstd or plain) as one stream of decompressed bytes.

Rotated Cowrie logs are often compressed, and a log compressed while the disk filled up or copied off a dying
sensor ends early or holds garbage. The stdlib's file objects raise on such damage and lose what they had
decompressed but not yet handed out; this stream returns every byte decompressed before the damage, then ends
and says what happened in ``damage``, so the caller can keep the good records and the damaged bytes.

Decompression is streamed: the file is read in ``_IN_CHUNK`` pieces and each decompressor call is limited to
``_OUT_PIECE`` bytes of output (zstd has no such limit: it is fed ``_ZSTD_FEED`` bytes at a time instead), so
memory does not grow with the file, however well it compresses.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import os
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import zstandard

GZIP, BZIP2, XZ, ZSTD = "gzip", "bzip2", "xz", "zstd"
FORMATS = (GZIP, BZIP2, XZ, ZSTD)
COMPRESSED_TRUNCATED = "compressed_truncated"
COMPRESSED_CORRUPT = "compressed_corrupt"
TRUNCATED_MESSAGE = "Compressed file ended before the end-of-stream marker was reached"

_MAGIC = {GZIP: b"\x1f\x8b", BZIP2: b"BZh", XZ: b"\xfd7zXZ\x00", ZSTD: b"\x28\xb5\x2f\xfd"}
_MAGIC_BYTES = 6
_BZIP2_LEVELS = frozenset(bytes([d]) for d in b"123456789")
_UNIT = {GZIP: "member", BZIP2: "stream", XZ: "stream", ZSTD: "frame"}
_PADDED = frozenset({GZIP, XZ})  # zero bytes between or after units are allowed (gzip tools, xz stream padding)
_IN_CHUNK = 64 * 1024
_OUT_PIECE = 64 * 1024
_ZSTD_FEED = 256  # a zstd block needs at least 4 bytes for 128 KiB of output: 256 bytes make at most 8 MiB
# What the decompressors raise on bad data. OSError is bz2's; the file is never read inside such a ``try``, so a
# real I/O error is never mistaken for damage.
_DATA_ERRORS: tuple[type[BaseException], ...] = (zlib.error, OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)


@dataclass(frozen=True)
class Damage:
    """Where a compressed stream stopped making sense, and why.

    ``decompressed_offset``: the returned data ends here.
    ``compressed_offset``: where the undecodable remainder of the file begins. It is found by decoding the damaged
    member/stream/frame again, one input byte at a time near the damage: the bytes before it were decoded into
    the returned data, the bytes from it on were not (the byte whose decoding raised always belongs to the
    remainder). For a stream cut short the remainder is what was left of the last block (bzip2 decodes whole
    blocks of up to 900 kB, zstd blocks of up to 128 KiB; gzip and xz decode almost to the last byte).
    ``detected_at``: the byte whose decoding raised (the end of the file for a stream cut short); the damage
    itself lies at or before it.
    ``unverified_from``: the decompressed offset where the damaged member/stream/frame begins. Its integrity
    check sits at its end and never passed, so the bytes from here to ``decompressed_offset`` are returned
    unverified, and after a checksum failure some of them are wrong: gzip checks whole members only; bzip2 and
    xz check each block, so for them the bound is conservative.

    What is returned is exactly what the decompressor hands back, fed one byte at a time and drained in
    ``_OUT_PIECE`` pieces, before it raises: Python's decompressors drop the output of the call that raises, so
    that piece alone is lost. For gzip and xz it is the output of the symbols in the failing byte (a few bytes);
    for bzip2, whose block CRC is checked after the block was decoded, the last piece of that block (the rest of
    it is returned, unverified); for zstd, the block being decoded.
    """

    reason: str  # COMPRESSED_TRUNCATED or COMPRESSED_CORRUPT
    compression: str
    decompressed_offset: int
    compressed_offset: int
    detected_at: int
    unverified_from: int
    message: str
    unit_offset: int = 0  # where the damaged member/stream/frame starts in the file (its compressed bytes)


@dataclass(frozen=True)
class Tail:
    """The compressed bytes from the damage to the end of the file: at most ``limit`` of them kept."""

    data: bytes
    size: int  # the full length
    sha256: str  # of all ``size`` bytes

    @property
    def capped(self) -> bool:
        return len(self.data) < self.size


def detect(head: bytes) -> str | None:
    """The compression format the first bytes of a file announce, or None for anything else (read as plain).

    bzip2 also needs its block-size digit after ``BZh``: text that happens to start with "BZh" stays text.
    """
    for name, magic in _MAGIC.items():
        if head.startswith(magic) and (name != BZIP2 or head[3:4] in _BZIP2_LEVELS):
            return name
    return None


class _Unit(Protocol):
    """One gzip member, bzip2 or xz stream, or zstd frame being decoded."""

    eof: bool

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decode ``data`` (all of it, or up to the unit's end), yielding non-empty pieces; raise on bad data."""
        ...

    def unused(self) -> int:
        """How many bytes of the last ``feed`` lie after the unit's end (once ``eof``)."""
        ...


class _ZlibUnit:
    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)  # one gzip member: header, deflate data, CRC-32 and size

    @property
    def eof(self) -> bool:
        return self._d.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        while True:
            out = self._d.decompress(data, _OUT_PIECE)
            if out:
                yield out
            data = self._d.unconsumed_tail
            if self._d.eof or (not data and len(out) < _OUT_PIECE):  # a full piece may leave output pending
                return

    def unused(self) -> int:
        return len(self._d.unused_data)


class _LimitedUnit:
    """bz2 and lzma decompressors: same interface, input kept inside them while output is limited.

    Drained until a call returns nothing: bz2 reports ``needs_input`` as soon as its input is used up, even with
    output still pending, and then returns at most 32 KiB a call; at the end of a file that output would be lost.
    """

    def __init__(self, decompressor: Any) -> None:
        self._d = decompressor

    @property
    def eof(self) -> bool:
        return bool(self._d.eof)

    def feed(self, data: bytes) -> Iterator[bytes]:
        out = self._d.decompress(data, _OUT_PIECE)
        empty = 0
        while True:
            if out:
                yield out
                empty = 0
            else:
                empty += 1
            if self._d.eof or (empty and self._d.needs_input) or empty > 1:
                return
            out = self._d.decompress(b"", _OUT_PIECE)

    def unused(self) -> int:
        return len(self._d.unused_data)


class _ZstdUnit:
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj(read_across_frames=False)
        self._unused = 0

    @property
    def eof(self) -> bool:
        return bool(self._d.eof)

    def feed(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(view), _ZSTD_FEED):
            out = self._d.decompress(view[start : start + _ZSTD_FEED])
            if out:
                yield out
            if self._d.eof:
                self._unused = len(self._d.unused_data) + max(0, len(view) - start - _ZSTD_FEED)
                return

    def unused(self) -> int:
        return self._unused


_UNITS: dict[str, Callable[[], _Unit]] = {
    GZIP: _ZlibUnit,
    BZIP2: lambda: _LimitedUnit(bz2.BZ2Decompressor()),
    XZ: lambda: _LimitedUnit(lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
    ZSTD: _ZstdUnit,
}


def _starts_unit(compression: str, head: bytes) -> bool:
    """Whether the bytes after a complete unit begin another one, or may (the file ends inside its magic)."""
    if len(head) < _MAGIC_BYTES and (_MAGIC[compression].startswith(head) or detect(head) == compression):
        return True  # cut short right after the previous unit: the next one is decoded, and found truncated
    if compression == ZSTD and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        return True  # a skippable frame (magic 0x184D2A50-5F), which zstd passes over
    return detect(head) == compression


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class LogStream(io.RawIOBase):
    """A log file's bytes, decompressed when its magic bytes say so; ``read(n)`` streams them.

    ``compression`` is the format (None: plain bytes). ``damage`` is set once the stream has ended early on damaged
    compressed data (None while reading, and for intact or plain files). ``bytes_read`` counts bytes taken from the
    file, for progress. The stream owns ``file`` (a seekable binary file, read only with a size) and closes it.
    """

    def __init__(self, file: BinaryIO, name: str = "") -> None:
        super().__init__()
        self._file = file
        self.name = name
        head = file.read(_MAGIC_BYTES)
        file.seek(0)
        self.compression: str | None = detect(head)
        self.damage: Damage | None = None
        self.bytes_read = 0
        self._emitted = 0  # decompressed bytes handed to the buffer so far
        self._pieces: Generator[bytes, None, None] | None = self._decode() if self.compression else None
        self._buf = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._file.fileno()

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (fewer only at the end, or where a piece ends); b"" at the end of the data."""
        if self.closed:
            raise ValueError("read from a closed log stream")
        if size is None or size < 0:
            return self.readall()
        if self._pieces is None:
            data = self._file.read(size)
            self.bytes_read += len(data)
            return data
        while self._pos >= len(self._buf):
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._buf, self._pos = piece, 0
        data = self._buf[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self._pieces is not None:
                self._pieces.close()
            self._file.close()
        super().close()

    def tail(self, limit: int) -> Tail:
        """The compressed bytes from ``damage.compressed_offset`` to the end of the file, from the same open file.

        Only the first ``limit`` bytes are kept; the length and SHA-256 cover them all (read in pieces).
        """
        if self.damage is None:
            raise ValueError("the stream is not damaged: it has no tail")
        self._file.seek(self.damage.compressed_offset)
        kept, size, digest = bytearray(), 0, hashlib.sha256()
        while chunk := self._file.read(_IN_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if len(kept) < limit:
                kept += chunk[: limit - len(kept)]
        self.bytes_read = max(self.bytes_read, self.damage.compressed_offset + size)
        return Tail(bytes(kept), size, digest.hexdigest())

    # --- decoding ---------------------------------------------------------------------------------------------

    def _decode(self) -> Generator[bytes, None, None]:
        start: int | None = 0
        while start is not None:
            start = yield from self._decode_unit(start)
            if start is not None:
                start = self._next_unit(start)

    def _next_unit(self, end: int) -> int | None:
        """Where the unit after the one ending at ``end`` starts: None at the end of the file, or on garbage."""
        assert self.compression is not None
        at = end
        self._file.seek(end)
        if self.compression in _PADDED:
            while True:
                block = self._file.read(_IN_CHUNK)
                zeros = len(block) - len(block.lstrip(b"\x00"))
                at += zeros
                if zeros < len(block) or not block:
                    break
            self._file.seek(at)
        head = self._file.read(_MAGIC_BYTES)
        self.bytes_read = max(self.bytes_read, at + len(head))
        if not head:
            return None
        if _starts_unit(self.compression, head):
            return at
        unit = _UNIT[self.compression]
        self.damage = Damage(
            COMPRESSED_CORRUPT, self.compression, self._emitted, end, at, self._emitted,
            f"the data at byte {at}, after a complete {self.compression} {unit}, is not a {self.compression} {unit}",
            end,
        )  # fmt: skip
        return None

    def _decode_unit(self, start: int) -> Generator[bytes, None, int | None]:
        """Decode the unit at ``start``; return where the next one may start, or None once damage was found."""
        assert self.compression is not None
        unit = _UNITS[self.compression]()
        unit_out = self._emitted
        pos = start
        last_productive: tuple[int, int] | None = None  # the last input chunk that yielded output
        self._file.seek(start)
        while not unit.eof:
            chunk = self._file.read(_IN_CHUNK)
            if not chunk:
                windows = [last_productive] if last_productive else []
                yield from self._damaged(start, unit_out, windows, pos, None)
                return None
            self.bytes_read = max(self.bytes_read, pos + len(chunk))
            produced = False
            try:
                for piece in unit.feed(chunk):
                    produced = True
                    self._emitted += len(piece)
                    yield piece
            except _DATA_ERRORS as exc:
                failing = (pos, pos + len(chunk))
                windows = [last_productive] if last_productive and not produced else []
                yield from self._damaged(start, unit_out, [*windows, failing], failing[1], exc)
                return None
            if produced:
                last_productive = (pos, pos + len(chunk))
            pos += len(chunk)
        return pos - unit.unused()

    def _damaged(
        self, start: int, unit_out: int, windows: list[tuple[int, int]], stop: int, error: BaseException | None
    ) -> Generator[bytes, None, None]:
        """Decode the damaged unit again to find exact offsets, yielding what was lost with the failing call.

        Python's decompressors drop the output of a call that raises, so the unit is decoded again from its start:
        in whole chunks up to the ``windows`` (the chunk that raised, and the last one that yielded output), and
        one byte at a time inside them. Output beyond what was already returned is returned now. This costs a
        second decoding of the damaged unit up to the damage (for a single-stream file, of the whole file), paid
        only when there is damage.
        """
        assert self.compression is not None
        returned = self._emitted - unit_out
        produced, productive_end, detected_at, exc = 0, start, stop, error
        if windows or error is not None:
            unit = _UNITS[self.compression]()
            segments, at = [], start
            for lo, hi in windows:
                if at < lo:
                    segments.append((at, lo, _IN_CHUNK))
                segments.append((lo, hi, 1))
                at = hi
            if at < stop:
                segments.append((at, stop, _IN_CHUNK))
            found = False
            for lo, hi, step in segments:
                self._file.seek(lo)
                at = lo
                while at < hi and not found and not unit.eof:
                    data = self._file.read(min(step, hi - at))
                    if not data:
                        break
                    try:
                        for piece in unit.feed(data):
                            produced += len(piece)
                            productive_end = at + len(data)
                            if (new := produced - returned) > 0:
                                extra = piece[len(piece) - min(new, len(piece)) :]
                                returned += len(extra)
                                self._emitted += len(extra)
                                yield extra
                    except _DATA_ERRORS as replayed:
                        found, detected_at, exc = True, at, replayed
                    at += len(data)
                if found:
                    break
        self.damage = Damage(
            COMPRESSED_TRUNCATED if error is None else COMPRESSED_CORRUPT,
            self.compression,
            self._emitted,
            min(productive_end, detected_at),  # the byte that raised is never left out of the remainder
            detected_at,
            unit_out,
            TRUNCATED_MESSAGE if exc is None else _message(exc),
            start,
        )


def open_log(path: str | os.PathLike[str]) -> LogStream:
    """Open a log file for streaming, decompressing it when its first bytes (never its name) say it is compressed.

    A file that cannot be opened raises ``OSError`` naming it and why.
    """
    try:
        file = open(path, "rb")  # noqa: SIM115 - the stream owns and closes it
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot read {os.fsdecode(path)}: {exc.strerror or exc}") from exc
    try:
        return LogStream(file, os.fsdecode(path))
    except BaseException:
        file.close()
        raise


__all__ = [
    "BZIP2",
    "COMPRESSED_CORRUPT",
    "COMPRESSED_TRUNCATED",
    "FORMATS",
    "GZIP",
    "TRUNCATED_MESSAGE",
    "XZ",
    "ZSTD",
    "Damage",
    "LogStream",
    "Tail",
    "detect",
    "open_log",
]
