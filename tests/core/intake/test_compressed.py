"""Compressed and rotated Cowrie logs: read by magic bytes, every good byte kept, damage in exactly one dead letter.

The stream tests check ``dlq_assets.core.intake.compressed`` against the decompressors themselves, used independently: a
stream cut short must return all that the decompressor makes of the bytes there are, and a corrupt one all that
it makes of the bytes before the one it fails on (fed one byte at a time, so nothing is lost with the error).
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import io
import json
import lzma
import random
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import zstandard
from click.testing import CliRunner

from dlq_assets.cli import main
from dlq_assets.core.intake import ingest
from dlq_assets.core.intake.compressed import (
    COMPRESSED_CORRUPT,
    COMPRESSED_TRUNCATED,
    TRUNCATED_MESSAGE,
    LogStream,
    open_log,
)
from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.core.intake.reader import read_records
from dlq_assets.core.processing.pool import process
from dlq_assets.devtools.generator import write_corrupted_log
from tests.conftest import left_alone

FORMATS = ("gzip", "bzip2", "xz", "zstd")
SUFFIX = {"gzip": ".gz", "bzip2": ".bz2", "xz": ".xz", "zstd": ".zst"}
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "bzip2": lambda data: bz2.compress(data, 1),  # 100 kB blocks: several per test log
    "xz": lambda data: lzma.compress(data, preset=1),
    "zstd": lambda data: zstandard.ZstdCompressor(write_checksum=True).compress(data),
}
DATA_ERRORS = (zlib.error, OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)
BOM = b"\xef\xbb\xbf"


def decoder(fmt: str) -> Callable[[bytes], bytes]:
    """A fresh decompressor of one member/stream/frame, straight from the library, given all its input at once."""
    if fmt == "gzip":
        return zlib.decompressobj(wbits=31).decompress
    if fmt == "bzip2":
        return bz2.BZ2Decompressor().decompress
    if fmt == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress
    return zstandard.ZstdDecompressor().decompressobj().decompress


def drained(fmt: str) -> Callable[[bytes], Iterator[bytes]]:
    """A fresh decompressor that yields all the output of its input in pieces of at most 64 KiB (zstd's
    decompressobj has no limit: one piece)."""
    if fmt == "zstd":
        d = zstandard.ZstdDecompressor().decompressobj()

        def zstd_pieces(data: bytes) -> Iterator[bytes]:
            yield d.decompress(data)

        return zstd_pieces
    if fmt == "gzip":
        z = zlib.decompressobj(wbits=31)

        def zlib_pieces(data: bytes) -> Iterator[bytes]:
            while True:
                piece = z.decompress(data, 65536)
                yield piece
                data = z.unconsumed_tail
                if z.eof or (not data and len(piece) < 65536):
                    return

        return zlib_pieces
    limited = bz2.BZ2Decompressor() if fmt == "bzip2" else lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def limited_pieces(data: bytes) -> Iterator[bytes]:
        piece = limited.decompress(data, 65536)
        while piece:  # until it has no more to give (bz2's needs_input is set while output is still pending)
            yield piece
            piece = b"" if limited.eof else limited.decompress(b"", 65536)

    return limited_pieces


def bytewise(fmt: str, blob: bytes) -> tuple[bytes, int | None]:
    """What the decompressor hands back for ``blob`` fed one byte at a time before it raises, and the byte it
    raised on: the definition of what a damaged stream returns (only the piece being decoded is lost)."""
    decode, out = drained(fmt), bytearray()
    for i in range(len(blob)):
        try:
            for piece in decode(blob[i : i + 1]):
                out += piece
        except DATA_ERRORS:
            return bytes(out), i
    return bytes(out), None


def drain(stream: Any, size: int = 65536) -> bytes:
    out = bytearray()
    while piece := stream.read(size):
        out += piece
    return bytes(out)


def decompressed(blob: bytes) -> tuple[bytes, LogStream]:
    stream = LogStream(io.BytesIO(blob))
    return drain(stream), stream


@pytest.fixture(scope="module")
def log_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("logs") / "cowrie.json"
    write_corrupted_log(path, n_events=600, seed=11, truth_path=None)
    return path.read_bytes()


def placements(conn: psycopg.Connection, path: Path) -> list[tuple[Any, ...]]:
    """Where each record of one source went: (offset, table, eventid or reason, payload checksum), in offset order."""
    source = str(path.resolve())
    raw = conn.execute(
        "SELECT source_offset, 'raw', eventid, payload_checksum FROM raw_events WHERE source = %s", [source]
    ).fetchall()
    dead = conn.execute(
        "SELECT source_offset, 'dlq', reason, payload_checksum FROM dead_letter_events WHERE source = %s", [source]
    ).fetchall()
    return sorted(raw + dead)


def counts(conn: psycopg.Connection) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM raw_events), (SELECT count(*) FROM dead_letter_events), "
        "(SELECT count(*) FROM dlq_poison_events)"
    ).fetchone()
    assert row is not None
    return row


def tail_letters(conn: psycopg.Connection) -> list[dict[str, Any]]:
    cur = conn.execute(
        "SELECT source, source_offset, reason, payload, metadata_json, classification, priority"
        "  FROM dead_letter_events WHERE reason IN (%s, %s) ORDER BY source",
        [COMPRESSED_TRUNCATED, COMPRESSED_CORRUPT],
    )
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# --- the stream -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_concatenated_units_decompress_to_the_same_bytes(fmt: str, log_bytes: bytes) -> None:
    cut = len(log_bytes) // 3 + 7  # inside a record: units need not end at a line
    padding = b"\x00" * 8 if fmt in ("gzip", "xz") else b""  # gzip tools and xz stream padding allow it
    blob = COMPRESS[fmt](log_bytes[:cut]) + padding + COMPRESS[fmt](log_bytes[cut:]) + padding
    out, stream = decompressed(blob)
    assert out == log_bytes
    assert (stream.compression, stream.damage, stream.bytes_read) == (fmt, None, len(blob))
    buffer = bytearray(1000)
    again = LogStream(io.BytesIO(blob))
    assert again.readinto(buffer) == 1000 and bytes(buffer) == log_bytes[:1000]


def test_format_comes_from_magic_bytes_and_anything_else_is_plain(tmp_path: Path) -> None:
    cases = {
        "gzip_named.json": (gzip.compress(b"{}\n"), "gzip"),
        "plain_named.json.gz": (b"{}\n", None),
        "text_starting_BZh.json": (b"BZhello\n", None),  # no block-size digit: not bzip2
        "empty.json.xz": (b"", None),
        "zstd_named.log": (zstandard.ZstdCompressor().compress(b"{}\n"), "zstd"),
    }
    for name, (content, fmt) in cases.items():
        (tmp_path / name).write_bytes(content)
        with open_log(tmp_path / name) as stream:
            expected = b"{}\n" if fmt else content
            assert (stream.compression, drain(stream)) == (fmt, expected), name


def test_zstd_skippable_frames_are_passed_over() -> None:
    skippable = b"\x5a\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"hello"
    frame = zstandard.ZstdCompressor().compress(b'{"a": 1}\n')
    out, stream = decompressed(frame + skippable + frame)
    assert out == b'{"a": 1}\n' * 2 and stream.damage is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_stream_cut_short_returns_every_byte_its_data_holds(fmt: str, log_bytes: bytes) -> None:
    blob = COMPRESS[fmt](log_bytes)
    for cut in (7, 12, len(blob) // 3, len(blob) // 2, *range(len(blob) - 40, len(blob))):
        out, stream = decompressed(blob[:cut])
        expected = decoder(fmt)(blob[:cut])  # the library, given every byte there is, all at once
        assert out == expected == b"".join(drained(fmt)(blob[:cut])) and log_bytes.startswith(out), (fmt, cut)
        damage = stream.damage
        assert damage is not None and damage.reason == COMPRESSED_TRUNCATED, (fmt, cut)
        assert (damage.message, damage.compression, damage.detected_at) == (TRUNCATED_MESSAGE, fmt, cut)
        assert (damage.decompressed_offset, damage.unverified_from) == (len(out), 0)
        # compressed_offset: the bytes before it hold all that came out, the bytes from it on add nothing
        assert 0 <= damage.compressed_offset <= cut
        assert b"".join(drained(fmt)(blob[: damage.compressed_offset])) == out
        if damage.compressed_offset > 0:
            assert len(b"".join(drained(fmt)(blob[: damage.compressed_offset - 1]))) < len(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_data_returns_everything_decoded_before_the_failing_byte(fmt: str, log_bytes: bytes) -> None:
    blob = COMPRESS[fmt](log_bytes)
    rng = random.Random(fmt)
    for where in (0.3, 0.5, 0.8):
        bad = bytearray(blob)
        bad[int(len(blob) * where)] ^= 1 << rng.randrange(8)
        expected, failing = bytewise(fmt, bytes(bad))
        assert failing is not None, (fmt, where)  # every format here checks its data
        out, stream = decompressed(bytes(bad))
        assert out == expected, (fmt, where)
        damage = stream.damage
        assert damage is not None and damage.reason == COMPRESSED_CORRUPT and damage.detected_at == failing
        assert damage.decompressed_offset == len(out) and damage.compressed_offset <= failing
        assert damage.message and damage.unverified_from == 0


def test_gzip_file_objects_lose_what_they_buffered_and_this_stream_does_not(log_bytes: bytes) -> None:
    bad = bytearray(gzip.compress(log_bytes))
    bad[len(bad) // 2] ^= 0x10
    stdlib = gzip.GzipFile(fileobj=io.BytesIO(bytes(bad)))
    got = bytearray()
    with pytest.raises((zlib.error, gzip.BadGzipFile, EOFError)):
        while piece := stdlib.read(65536):
            got += piece
    out, stream = decompressed(bytes(bad))
    assert out == bytewise("gzip", bytes(bad))[0] and len(out) > len(got)
    assert stream.damage is not None and stream.damage.reason == COMPRESSED_CORRUPT


def test_data_after_a_complete_unit_that_is_no_unit_is_damage(log_bytes: bytes) -> None:
    member = gzip.compress(log_bytes)
    out, stream = decompressed(member + b"\x00\x00not gzip at all")
    assert out == log_bytes
    assert stream.damage is not None
    assert (stream.damage.reason, stream.damage.compressed_offset, stream.damage.detected_at) == (
        COMPRESSED_CORRUPT, len(member), len(member) + 2)  # fmt: skip
    assert stream.damage.unverified_from == len(log_bytes)  # the member before passed its CRC
    out, stream = decompressed(bz2.compress(log_bytes) + b"\x00")  # bzip2 has no padding
    assert out == log_bytes and stream.damage is not None and stream.damage.reason == COMPRESSED_CORRUPT
    out, stream = decompressed(member + b"\x1f")  # the next member's magic, cut
    assert out == log_bytes and stream.damage is not None and stream.damage.reason == COMPRESSED_TRUNCATED


class _SizedReadsOnly(io.BytesIO):
    """A file that fails any read without a size, or larger than 64 KiB, and counts the bytes read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.total = 0

    def read(self, size: int | None = -1, /) -> bytes:
        assert size is not None and 0 <= size <= 65536, f"read({size})"
        data = super().read(size)
        self.total += len(data)
        return data


@pytest.mark.parametrize("fmt", [*FORMATS, None])
def test_the_file_is_only_read_in_bounded_pieces(fmt: str | None, log_bytes: bytes) -> None:
    blob = COMPRESS[fmt](log_bytes) if fmt else log_bytes
    damaged = blob[: len(blob) * 9 // 10]  # the cut-short path, with its second decoding and the tail
    file = _SizedReadsOnly(damaged)
    stream = LogStream(file)
    records = list(read_records(stream))
    assert records and file.total < 3 * len(damaged) + 65536
    if fmt:
        assert stream.damage is not None
        tail = stream.tail(100)
        assert tail.size == len(damaged) - stream.damage.compressed_offset and len(tail.data) == min(100, tail.size)


BOMBS = [("gzip", 256 << 20, 4 << 20), ("zstd", 256 << 20, 24 << 20), ("bzip2", 32 << 20, 4 << 20),
         ("xz", 64 << 20, 12 << 20)]  # fmt: skip


@pytest.mark.parametrize(("fmt", "size", "limit"), BOMBS)
def test_memory_stays_bounded_however_well_the_data_compresses(fmt: str, size: int, limit: int) -> None:
    """A compression bomb: memory follows the pieces (zstd's reach 8 MiB from 256 input bytes) and the format's
    own state (xz's default dictionary is 8 MiB), never the decompressed size."""
    bomb = {"gzip": lambda d: gzip.compress(d, 9), "bzip2": bz2.compress, "xz": lzma.compress,
            "zstd": zstandard.ZstdCompressor().compress}[fmt](b"\x00" * size)  # fmt: skip
    stream = LogStream(io.BytesIO(bomb))
    tracemalloc.start()
    try:
        total = 0
        while piece := stream.read(65536):
            total += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == size and stream.damage is None
    assert peak < limit, f"{fmt}: peak {peak / 2**20:.1f} MiB for {size >> 20} MiB decompressed"


def test_a_file_that_cannot_be_read_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=rf"cannot read {tmp_path}"):
        open_log(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cannot read .*nope\.json\.gz: No such file"):
        open_log(tmp_path / "nope.json.gz")


# --- ingest ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_ingests_the_rows_of_the_plain_file_at_the_same_offsets(
    fmt: str, db_url: str, conn: psycopg.Connection, tmp_path: Path, log_bytes: bytes
) -> None:
    plain = tmp_path / "cowrie.json"
    plain.write_bytes(log_bytes)
    packed = tmp_path / f"cowrie.json.1{SUFFIX[fmt]}"
    packed.write_bytes(COMPRESS[fmt](log_bytes))
    reference = ingest_paths([plain], url=db_url)
    report = ingest_paths([packed], url=db_url, batch_size=97)
    assert placements(conn, packed) == placements(conn, plain) and len(placements(conn, plain)) == reference.records
    assert report.compressed_files == Counter({fmt: 1}) and report.damaged_files == []
    assert (report.raw_inserted, report.dlq_inserted) == (reference.raw_inserted, reference.dlq_inserted)
    again = ingest_paths([packed], url=db_url)
    assert (again.raw_inserted, again.dlq_inserted) == (0, 0)


def test_magic_bytes_decide_not_names_and_multi_member_gzip_reads_whole(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, log_bytes: bytes
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    reference = tmp_path / "reference.json"
    reference.write_bytes(log_bytes)
    (logs / "cowrie.json").write_bytes(gzip.compress(log_bytes))  # gzip under a plain name
    (logs / "cowrie.json.3.gz").write_bytes(log_bytes)  # plain under a gzip name
    cuts = sorted(random.Random(3).sample(range(1, len(log_bytes)), 4))
    parts = [log_bytes[a:b] for a, b in zip([0, *cuts], [*cuts, len(log_bytes)], strict=True)]
    (logs / "cowrie.json.4.gz").write_bytes(b"".join(gzip.compress(p) for p in parts))
    ingest_paths([reference], url=db_url)
    report = ingest_paths([logs], url=db_url)
    assert report.files == 3 and report.compressed_files == Counter(gzip=2) and report.damaged_files == []
    expected = placements(conn, reference)
    for name in ("cowrie.json", "cowrie.json.3.gz", "cowrie.json.4.gz"):
        assert placements(conn, logs / name) == expected, name


def test_rotated_directory_with_a_gzip_cut_short_then_processing_then_ingesting_again_adds_nothing(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    logs, plain = tmp_path / "cowrie", tmp_path / "plain"
    logs.mkdir()
    plain.mkdir()
    contents = {}
    for seed, name in enumerate(("cowrie.json", "cowrie.json.2026-03-01", "cowrie.json.2026-03-02",
                                 "cowrie.json.2026-03-03"), start=21):  # fmt: skip
        write_corrupted_log(plain / name, n_events=250, seed=seed, truth_path=None)
        contents[name] = (plain / name).read_bytes()
    (logs / "cowrie.json").write_bytes(contents["cowrie.json"])
    (logs / "cowrie.json.2026-03-01.gz").write_bytes(gzip.compress(contents["cowrie.json.2026-03-01"]))
    (logs / "cowrie.json.2026-03-02.bz2").write_bytes(bz2.compress(contents["cowrie.json.2026-03-02"]))
    whole = gzip.compress(contents["cowrie.json.2026-03-03"])
    cut_short = logs / "cowrie.json.2026-03-03.gz"
    cut_short.write_bytes(whole[: len(whole) // 2])
    (logs / "cowrie.log").write_text("2026-03-03T00:00:00Z [cowrie] a text log, not JSON\n")
    (logs / "cowrie.json.2026-03-03.gz.tmp").write_bytes(b"")
    good = zlib.decompressobj(wbits=31).decompress(whole[: len(whole) // 2])  # all the cut stream holds
    (plain / "good.json").write_bytes(good)
    left_alone(cut_short, plain / "good.json")  # cut on purpose: finished files, not ones being written

    ingest_paths([plain / "cowrie.json.2026-03-01", plain / "cowrie.json.2026-03-02", plain / "good.json"], url=db_url)
    progress: list[int] = []
    report = ingest_paths([logs], url=db_url, batch_size=64, on_batch=progress.append)

    assert report.files == 4 and report.compressed_files == Counter(gzip=2, bzip2=1)
    assert sorted((s["path"], s["reason"]) for s in report.skipped_files) == [
        (str(logs / "cowrie.json.2026-03-03.gz.tmp"), "name is not a Cowrie JSON log's"),
        (str(logs / "cowrie.log"), "name is not a Cowrie JSON log's"),
    ]
    assert sum(progress) == sum(p.stat().st_size for p in logs.iterdir() if p.name != "cowrie.log" and
                                not p.name.endswith(".tmp"))  # fmt: skip
    for name, reference in (("cowrie.json.2026-03-01.gz", "cowrie.json.2026-03-01"),
                            ("cowrie.json.2026-03-02.bz2", "cowrie.json.2026-03-02")):  # fmt: skip
        assert placements(conn, logs / name) == placements(conn, plain / reference)

    (damaged,) = report.damaged_files
    assert damaged["path"] == str(cut_short.resolve()) and damaged["reason"] == COMPRESSED_TRUNCATED
    assert damaged["decompressed_offset"] == len(good) and contents["cowrie.json.2026-03-03"].startswith(good)
    (letter,) = tail_letters(conn)
    assert placements(conn, cut_short) == sorted(
        [*placements(conn, plain / "good.json"), (len(good), "dlq", COMPRESSED_TRUNCATED, letter_checksum(conn))]
    )  # the records before the damage exactly as the good bytes give them (the last one cut), then the tail
    tail = cut_short.read_bytes()[damaged["compressed_offset"] :]
    meta = letter["metadata_json"]
    assert letter["source_offset"] == len(good) and base64.b64decode(letter["payload"]["raw_base64"]) == tail
    assert meta == {
        "payload_form": "raw_base64", "compression": "gzip", "compressed_offset": damaged["compressed_offset"],
        "detected_at": len(whole) // 2, "unverified_from": 0, "tail_bytes": len(tail),
        "tail_sha256": hashlib.sha256(tail).hexdigest(), "stored_bytes": len(tail), "tail_capped": False,
        "message": TRUNCATED_MESSAGE,
    }  # fmt: skip
    assert (letter["classification"], letter["priority"]) == ("binary", 9)
    assert json.loads(json.dumps(report.as_dict())) == report.as_dict()

    process(db_url)
    before = counts(conn)
    again = ingest_paths([logs], url=db_url)
    assert counts(conn) == before
    assert (again.raw_inserted, again.dlq_inserted) == (0, 0) and len(again.damaged_files) == 1


def letter_checksum(conn: psycopg.Connection) -> str:
    row = conn.execute(
        "SELECT payload_checksum FROM dead_letter_events WHERE reason IN (%s, %s)",
        [COMPRESSED_TRUNCATED, COMPRESSED_CORRUPT],
    ).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.parametrize("fmt", ["xz", "bzip2", "gzip"])
def test_a_bit_flip_keeps_the_verified_members_and_the_corrupt_one_whole_in_one_dead_letter(
    fmt: str, db_url: str, conn: psycopg.Connection, tmp_path: Path, log_bytes: bytes
) -> None:
    """A member whose checksum fails may have decoded into wrong bytes (a flip in a stored gzip block changes one
    character and nothing else notices): none of it is ingested; its compressed bytes are the dead letter."""
    cut = log_bytes.index(b"\n", len(log_bytes) // 2) + 1  # the second member starts a line
    first = COMPRESS[fmt](log_bytes[:cut])
    second = bytearray(COMPRESS[fmt](log_bytes[cut:]))
    second[len(second) * 3 // 5] ^= 0x04
    path = tmp_path / f"cowrie.json.2026-03-04{SUFFIX[fmt]}"
    path.write_bytes(first + bytes(second))
    (tmp_path / "good.json").write_bytes(log_bytes[:cut])
    ingest_paths([tmp_path / "good.json"], url=db_url)

    report = ingest_paths([path], url=db_url)
    (damaged,) = report.damaged_files
    assert damaged["reason"] == COMPRESSED_CORRUPT and damaged["message"]
    assert (damaged["decompressed_offset"], damaged["compressed_offset"]) == (cut, len(first))
    (letter,) = tail_letters(conn)
    assert placements(conn, path) == sorted(
        [*placements(conn, tmp_path / "good.json"), (cut, "dlq", COMPRESSED_CORRUPT, letter_checksum(conn))]
    )
    assert base64.b64decode(letter["payload"]["raw_base64"]) == bytes(second)
    assert letter["metadata_json"]["tail_sha256"] == hashlib.sha256(second).hexdigest()
    assert report.dlq_reasons[COMPRESSED_CORRUPT] == 1

    before = counts(conn)
    again = ingest_paths([path], url=db_url)
    assert counts(conn) == before and (again.raw_inserted, again.dlq_inserted) == (0, 0)
    assert again.dlq_duplicates == report.dlq_inserted


def test_a_flip_in_a_stored_gzip_block_changes_no_event(db_url: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    line = b'{"eventid": "cowrie.session.connect", "src_port": 53500, "timestamp": "2018-05-09T00:06:12.624076Z", '
    line += b'"src_ip": "121.18.238.115", "session": "6c54accd90dd", "dst_port": 2222, "dst_ip": "172.17.0.3"}\n'
    blob = bytearray(gzip.compress(line * 50, compresslevel=0))
    at = blob.index(b"53500")
    blob[at] = ord("9")  # still valid JSON, still a valid event, and wrong: only the CRC at the end knows
    path = tmp_path / "cowrie.json.gz"
    path.write_bytes(bytes(blob))
    report = ingest_paths([path], url=db_url)
    assert report.raw_inserted == 0 and report.dlq_reasons == {COMPRESSED_CORRUPT: 1}
    assert conn.execute("SELECT count(*) FROM raw_events WHERE payload ->> 'src_port' = '93500'").fetchone() == (0,)


def test_a_tail_longer_than_the_cap_is_stored_capped_with_its_full_length_and_hash(
    db_url: str, conn: psycopg.Connection, tmp_path: Path, log_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "MAX_TAIL_BYTES", 1000)
    member = gzip.compress(log_bytes)
    junk = random.Random(5).randbytes(5000)
    path = tmp_path / "cowrie.json.gz"
    path.write_bytes(member + junk)
    report = ingest_paths([path], url=db_url)
    (damaged,) = report.damaged_files
    assert (damaged["reason"], damaged["compressed_offset"], damaged["tail_bytes"]) == (
        COMPRESSED_CORRUPT, len(member), len(junk))  # fmt: skip
    (letter,) = tail_letters(conn)
    meta = letter["metadata_json"]
    assert base64.b64decode(letter["payload"]["raw_base64"]) == junk[:1000]
    assert (meta["tail_bytes"], meta["stored_bytes"], meta["tail_capped"]) == (5000, 1000, True)
    assert meta["tail_sha256"] == hashlib.sha256(junk).hexdigest()
    assert letter["source_offset"] == len(log_bytes) and meta["unverified_from"] == len(log_bytes)
    assert ingest_paths([path], url=db_url).dlq_inserted == 0


def test_a_byte_order_mark_in_a_compressed_log_is_skipped_and_counted(
    db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    event = (b'{"eventid": "cowrie.session.connect", "timestamp": "2024-01-15T10:30:00Z", "session": "3f2a9c0b1d4e", '
             b'"src_ip": "203.0.113.10", "src_port": 50122, "dst_ip": "192.0.2.1", "dst_port": 22, '
             b'"protocol": "ssh", "sensor": "hp1", "message": "New connection"}\n')  # fmt: skip
    path = tmp_path / "cowrie.json.zst"
    path.write_bytes(COMPRESS["zstd"](BOM + event))
    report = ingest_paths([path], url=db_url)
    assert (report.boms_skipped, report.raw_inserted, report.dlq_inserted) == (1, 1, 0)
    assert placements(conn, path)[0][0] == len(BOM)  # offsets count the decompressed bytes, the mark included


def test_cli_reports_a_damaged_file_on_stderr_and_in_json_and_exits_0(db_url: str, tmp_path: Path) -> None:
    data = b'{"eventid": "cowrie.session.closed", "timestamp": "2024-01-15T10:30:00Z", "session": "3f2a9c0b1d4e"}\n'
    whole = bz2.compress(data * 2000, 1)
    (tmp_path / "cowrie.json.2026-03-05.bz2").write_bytes(whole[: len(whole) - 40])
    left_alone(tmp_path / "cowrie.json.2026-03-05.bz2")
    (tmp_path / "cowrie.log").write_text("not json\n")
    result = CliRunner().invoke(main, ["--database-url", db_url, "ingest", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (damaged,) = report["damaged_files"]
    assert damaged["reason"] == COMPRESSED_TRUNCATED and report["compressed_files"] == {"bzip2": 1}
    assert report["skipped_files"] == [{"path": str(tmp_path / "cowrie.log"), "reason": "name is not a Cowrie "
                                        "JSON log's"}]  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.startswith("damaged:")]
    assert len(lines) == 1 and "cowrie.json.2026-03-05.bz2" in lines[0] and "cut short" in lines[0]
    assert f"the first {damaged['decompressed_offset']} decompressed bytes" in lines[0]
    assert "skipped 1 directory entry: 1 name is not a Cowrie JSON log's" in result.stderr

    result = CliRunner().invoke(main, ["--database-url", db_url, "ingest", str(tmp_path)])
    assert result.exit_code == 0 and "damaged_files" in result.stdout and "damaged:" in result.stderr
