"""Ingest memory follows the batch budget, not the file: a one-line file of any size (plain, or a small gzip that
expands to it) costs a few times the budget above the interpreter's own peak, and every byte still lands."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from dlq_assets.core.intake.ingest import DEFAULT_BATCH_BYTES, _batches
from dlq_assets.core.intake.reader import DEFAULT_MAX_RECORD_BYTES, Record
from tests.conftest import left_alone

# The child ingests one file and prints its peak RSS (VmHWM, in KiB) as it ends.
PEAK_SCRIPT = """
import re, sys
from dlq_assets.core.intake.ingest import ingest_paths
ingest_paths([sys.argv[2]], url=sys.argv[1])
with open("/proc/self/status") as status:
    print(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
"""
LINE_BYTES = 48 * 2**20  # six pieces of the reader's 8 MiB cap: one batch of 2,000 records would take all six
# Measured above the baseline: 89 MiB plain, 96 MiB gzip (three pieces in hand: one written, as canonical JSON and as
# COPY text, one waiting for the next to be read, one being read; libpq's buffer, and what malloc keeps of them);
# about 200 MiB with batches counted in records alone.
BOUND = 16 * DEFAULT_BATCH_BYTES


def peak_kib(url: str, path: Path) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, url, str(path)], capture_output=True, text=True, timeout=120, check=True
    )
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
def test_a_huge_one_line_file_costs_the_budget_not_its_size_and_every_byte_lands(
    packed: bool, db_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    data = b'{"a": "' + b"x" * (LINE_BYTES - 7)
    tiny, big = tmp_path / "tiny.json", tmp_path / ("line.json.gz" if packed else "line.json")
    tiny.write_bytes(b'{"a": 1}\n')
    big.write_bytes(gzip.compress(data, 1) if packed else data)
    left_alone(big)  # its one line has no newline: a finished file, not one being written

    grown = (peak_kib(db_url, big) - peak_kib(db_url, tiny)) * 1024
    assert grown < BOUND, f"peak {grown / 2**20:.0f} MiB above the baseline, bound {BOUND / 2**20:.0f} MiB"

    pieces = conn.execute(
        "SELECT source_offset, reason, (metadata_json ->> 'record_bytes')::bigint, md5(payload ->> 'raw_text') "
        "FROM dead_letter_events WHERE source = %s ORDER BY source_offset",
        (str(big.resolve()),),
    ).fetchall()
    cap = DEFAULT_MAX_RECORD_BYTES
    expected = [(at, "record_too_large", len(data[at : at + cap]), hashlib.md5(data[at : at + cap]).hexdigest())
                for at in range(0, len(data), cap)]  # fmt: skip
    assert pieces == expected


def record(raw: bytes) -> Record:
    return Record(0, raw, error="json_parse_error")


def test_batches_end_at_the_count_or_before_the_budget_a_heavier_record_alone() -> None:
    small, big = record(b"x" * 400), record(b"x" * 3000)
    assert [b.records for b in _batches([small] * 10, 4, 10_000)] == [4, 4, 2]
    assert [b.records for b in _batches([small, small, big, small, big, big], 100, 3000)] == [2, 1, 1, 1, 1]
    # A record of many small values weighs what they cost once parsed, not its few bytes.
    values = record(b"[" + b"0," * 999 + b"0]")
    assert [b.records for b in _batches([values] * 8, 1000, 4 * 128 * 1000)] == [3, 3, 2]
