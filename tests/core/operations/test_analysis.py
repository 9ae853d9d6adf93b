"""Failure-pattern analysis against real PostgreSQL: empty, hand-built with known counts, and a real backlog."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib.image
import pandas as pd
import psycopg
import pytest

from dlq_assets.core.intake.ingest import ingest_paths
from dlq_assets.core.operations.analysis import COLUMNS, NONE, FailurePatterns, analyze, chart_png, load_failure_frame
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.pool import process
from dlq_assets.devtools.generator import write_corrupted_log

H0 = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
H1 = H0 + timedelta(hours=1)
FRAMES = ("by_reason", "by_source", "by_error_class", "by_strategy", "by_hour", "top_patterns", "by_hour_reason")


def rows(frame: pd.DataFrame) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in frame.itertuples(index=False)]


def assert_png(data: bytes) -> None:
    assert data.startswith(b"\x89PNG")
    height, width, *_ = matplotlib.image.imread(io.BytesIO(data), format="png").shape
    assert height >= 300 and width >= 500


def add(
    conn: psycopg.Connection,
    offset: int,
    reason: str,
    source: str,
    created_at: datetime,
    *,
    errors: tuple[str, ...] = (),
    method: str | None = None,
    quarantined: bool = False,
) -> int:
    history = [{"at": created_at.isoformat(), "attempt": n, "error_class": c, "message": "x", "lease": None}
               for n, c in enumerate(errors, 1)]  # fmt: skip
    return conn.execute(
        """
        INSERT INTO dead_letter_events (source, source_offset, reason, payload, metadata_json, created_at, resolved,
                                        resolved_at, resolution_method, retry_count, error_history, quarantined_at)
        VALUES (%s, %s, %s, %s, '{"payload_form": "raw_text"}', %s, %s, %s, %s, %s, %s, %s)
        RETURNING id
        """,
        (source, offset, reason, json.dumps({"raw_text": f"line {offset}"}), created_at, method is not None,
         created_at if method else None, method, len(errors), json.dumps(history),
         created_at if quarantined else None),
    ).fetchone()[0]  # fmt: skip


def poison(conn: psycopg.Connection, reason: str) -> list[int]:
    """Claim every event of ``reason`` and fail it with a class no policy retries: it moves to the poison table."""
    claimed = conn.execute("SELECT id, processing_lock FROM dlq_claim_events(100, 60, NULL, %s)", (reason,)).fetchall()
    ids = [i for i, _ in claimed]
    states = conn.execute(
        "SELECT final_state FROM dlq_complete_batch(%s, %s, %s, NULL, %s, %s)",
        (claimed[0][1], ids, ["failed"] * len(ids), ["handler_missing"] * len(ids), ["no handler"] * len(ids)),
    ).fetchall()
    assert {s for (s,) in states} == {"poisoned"}
    return ids


@pytest.fixture
def known(conn: psycopg.Connection) -> dict[str, int]:
    """10 events: 5 resolved, 2 unresolved, 2 poisoned, 1 quarantined; 6 created in hour H0, 4 in H1."""
    ids = {}
    for n in range(3):
        ids[f"tok{n}"] = add(conn, n, "json_parse_error", "a.json", H0 + timedelta(minutes=5 * n),
                             method="repair:tokenizer_fix")  # fmt: skip
    ids["stitch"] = add(conn, 3, "json_parse_error", "a.json", H1, method="repair:stitch")
    ids["pending0"] = add(conn, 4, "json_parse_error", "b.json", H1 + timedelta(minutes=1), errors=("unrepairable",))
    ids["pending1"] = add(conn, 5, "json_parse_error", "b.json", H1 + timedelta(minutes=2), errors=("unrepairable",))
    # The last entry of the history is what counts, not the first.
    ids["replay"] = add(conn, 6, "target_unavailable", "b.json", H0 + timedelta(minutes=30),
                        errors=("timeout", "target_write_failed"), method="replay")  # fmt: skip
    ids["tampered"] = add(conn, 7, "checksum_mismatch", "a.json", H1 + timedelta(minutes=3),
                          errors=("checksum_mismatch",), quarantined=True)  # fmt: skip
    for n in range(2):
        ids[f"mystery{n}"] = add(conn, 8 + n, "mystery", "c.json", H0 + timedelta(minutes=40 + n))
    assert sorted(poison(conn, "mystery")) == [ids["mystery0"], ids["mystery1"]]
    return ids


def test_an_empty_dlq_gives_empty_frames_zeros_and_a_chart(conn: psycopg.Connection) -> None:
    frame = load_failure_frame(conn)
    assert list(frame.columns) == list(COLUMNS) and frame.empty and frame.attrs["truncated"] is False
    patterns = analyze(conn)
    assert (patterns.total_events, patterns.unresolved, patterns.resolved, patterns.poisoned) == (0, 0, 0, 0)
    assert list(patterns.by_reason.columns) == [
        "reason", "events", "unresolved", "resolved", "poisoned", "quarantined", "share"
    ]  # fmt: skip
    assert list(patterns.by_source.columns) == ["source", "events", "unresolved"]
    assert list(patterns.by_error_class.columns) == ["error_class", "events"]
    assert list(patterns.by_strategy.columns) == ["resolution_method", "events"]
    assert list(patterns.by_hour.columns) == ["hour", "events", "unresolved"]
    assert list(patterns.top_patterns.columns) == [
        "reason", "error_class", "source", "events", "unresolved", "share", "example_id"
    ]  # fmt: skip
    assert all(getattr(patterns, name).empty for name in FRAMES)
    summary = patterns.summary()
    assert summary["total_events"] == 0 and all(v == 0 for v in summary.values())
    text = patterns.as_markdown()
    assert "**0 events**" in text and "### By reason" in text and "_none_" in text
    assert_png(chart_png(patterns))


def test_known_counts_in_every_frame(conn: psycopg.Connection, known: dict[str, int]) -> None:
    p = analyze(conn)
    assert (p.total_events, p.unresolved, p.resolved, p.poisoned, p.quarantined) == (10, 2, 5, 2, 1)
    assert rows(p.by_reason) == [
        ("json_parse_error", 6, 2, 4, 0, 0, 0.6),
        ("mystery", 2, 0, 0, 2, 0, 0.2),
        ("checksum_mismatch", 1, 0, 0, 0, 1, 0.1),
        ("target_unavailable", 1, 0, 1, 0, 0, 0.1),
    ]
    assert rows(p.by_source) == [("a.json", 5, 0), ("b.json", 3, 2), ("c.json", 2, 0)]
    assert rows(p.by_error_class) == [
        (NONE, 4),
        ("handler_missing", 2),  # a poisoned event's last history entry is the failure that poisoned it
        ("unrepairable", 2),
        ("checksum_mismatch", 1),
        ("target_write_failed", 1),
    ]
    assert rows(p.by_strategy) == [("repair:tokenizer_fix", 3), ("repair:stitch", 1), ("replay", 1)]
    assert rows(p.by_hour) == [(pd.Timestamp(H0), 6, 0), (pd.Timestamp(H1), 4, 2)]
    assert rows(p.by_hour_reason) == [
        (pd.Timestamp(H0), "json_parse_error", 3),
        (pd.Timestamp(H0), "mystery", 2),
        (pd.Timestamp(H0), "target_unavailable", 1),
        (pd.Timestamp(H1), "checksum_mismatch", 1),
        (pd.Timestamp(H1), "json_parse_error", 3),
    ]
    assert rows(p.top_patterns) == [
        ("json_parse_error", NONE, "a.json", 4, 0, 0.4, known["tok0"]),
        ("json_parse_error", "unrepairable", "b.json", 2, 2, 0.2, known["pending0"]),
        ("mystery", "handler_missing", "c.json", 2, 0, 0.2, known["mystery0"]),
        ("checksum_mismatch", "checksum_mismatch", "a.json", 1, 0, 0.1, known["tampered"]),
        ("target_unavailable", "target_write_failed", "b.json", 1, 0, 0.1, known["replay"]),
    ]
    assert p.summary() == {
        "total_events": 10, "unresolved": 2, "resolved": 5, "poisoned": 2, "quarantined": 1,
        "resolution_rate": 0.5, "poison_rate": 0.2, "reasons": 4, "error_classes": 4, "strategies": 3, "hours": 2,
        "top_reason_share": 0.6, "top_pattern_events": 4, "top_pattern_share": 0.4, "truncated": 0,
    }  # fmt: skip
    # top limits the sources and the patterns, not the totals.
    small = analyze(conn, top=2)
    assert len(small.by_source) == 2 and len(small.top_patterns) == 2 and small.total_events == 10


def test_the_frame_says_which_table_each_row_came_from(conn: psycopg.Connection, known: dict[str, int]) -> None:
    frame = load_failure_frame(conn).set_index("id")
    assert frame.loc[known["mystery0"], ["kind", "status", "poison_reason"]].tolist() == [
        "poison", "poisoned", "non_retryable:handler_missing"
    ]  # fmt: skip
    assert frame.loc[known["tampered"], ["kind", "status"]].tolist() == ["dead_letter", "quarantined"]
    assert frame.loc[known["replay"], ["retry_count", "payload_form"]].tolist() == [2, "raw_text"]
    assert (frame["created_at"].dt.tz is not None) and frame["created_at"].min() == pd.Timestamp(H0)


def test_since_filters_both_tables(conn: psycopg.Connection, known: dict[str, int]) -> None:
    p = analyze(conn, since=H1)
    assert (p.total_events, p.unresolved, p.resolved, p.poisoned, p.quarantined) == (4, 2, 1, 0, 1)
    assert rows(p.by_hour) == [(pd.Timestamp(H1), 4, 2)]
    naive = analyze(conn, since=(H0 + timedelta(minutes=35)).replace(tzinfo=None))  # naive is UTC
    assert (naive.total_events, naive.poisoned) == (6, 2)
    assert analyze(conn, since=H1 + timedelta(days=1)).total_events == 0


def test_limit_rows_keeps_the_newest_and_says_it_cut(conn: psycopg.Connection, known: dict[str, int]) -> None:
    frame = load_failure_frame(conn, limit_rows=3)
    assert len(frame) == 3 and frame.attrs["truncated"] is True
    assert set(frame["id"]) == {known["tampered"], known["pending1"], known["pending0"]}
    assert load_failure_frame(conn, limit_rows=10).attrs["truncated"] is False
    p = analyze(conn, limit_rows=3)
    assert p.truncated and p.summary()["truncated"] == 1 and "limit_rows" in p.as_markdown()
    with pytest.raises(ValueError):
        load_failure_frame(conn, limit_rows=0)


def test_markdown_and_chart(conn: psycopg.Connection, known: dict[str, int]) -> None:
    p = analyze(conn)
    text = p.as_markdown(limit=2)
    for header in ("## DLQ failure patterns", "### By reason", "### Top patterns", "### By error class",
                   "### By strategy", "### By source", "### By hour (UTC)"):  # fmt: skip
        assert header in text
    assert "| reason | events | unresolved | resolved | poisoned | quarantined | share |" in text
    assert "| json_parse_error | 6 | 2 | 4 | 0 | 0 | 60.0% |" in text
    assert "| 2024-03-01 11:00Z | 4 | 2 |" in text
    assert "target_unavailable" not in text.split("### Top patterns")[0]  # cut to 2 rows
    assert_png(chart_png(p))


def test_a_processed_backlog_adds_up(db_url: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    log = tmp_path / "cowrie.json"
    write_corrupted_log(log, n_events=600, seed=3, corruption_rate=0.5)
    ingest_paths([log], url=db_url)
    process(db_url, WorkerConfig(batch_size=50, min_batch_size=10, max_batch_size=200))
    p = analyze(conn, top=10_000)
    expected = conn.execute(
        """
        SELECT count(*) + (SELECT count(*) FROM dlq_poison_events), count(*) FILTER (WHERE resolved),
               count(*) FILTER (WHERE quarantined_at IS NOT NULL), (SELECT count(*) FROM dlq_poison_events)
          FROM dead_letter_events
        """
    ).fetchone()
    assert (p.total_events, p.resolved, p.quarantined, p.poisoned) == expected
    assert p.total_events == p.unresolved + p.resolved + p.poisoned + p.quarantined
    assert p.resolved > 0 and p.unresolved > 0
    for name in ("by_reason", "by_source", "by_error_class", "by_hour", "top_patterns", "by_hour_reason"):
        assert getattr(p, name)["events"].sum() == p.total_events, name
    for status in ("unresolved", "resolved", "poisoned", "quarantined"):
        assert p.by_reason[status].sum() == getattr(p, status)
    assert p.by_hour["unresolved"].sum() == p.by_source["unresolved"].sum() == p.unresolved
    assert p.by_reason["share"].sum() == pytest.approx(1.0)
    assert p.by_strategy["events"].sum() == p.resolved
    assert {"repair:tokenizer_fix", "repair:control_characters"} <= set(p.by_strategy["resolution_method"])
    assert "unrepairable" in set(p.by_error_class["error_class"])  # what the unrepairable ones wait with
    assert p.top_patterns["example_id"].is_unique
    top_reason = p.by_reason["reason"].iloc[0]
    assert f"| {top_reason} | " in p.as_markdown()
    assert_png(chart_png(p))


def test_odd_values_and_many_reasons(conn: psycopg.Connection) -> None:
    for n in range(12):  # more reasons than the chart's legend shows: the rest fold into one
        conn.execute(
            "INSERT INTO dead_letter_events (reason, payload, idempotency_key) VALUES (%s, '{}', %s)",
            ("x|y" if n == 0 else f"reason_{n}", uuid.uuid4().hex),
        )
    p = analyze(conn)
    assert isinstance(p, FailurePatterns) and p.unresolved == 12
    assert all(isinstance(v, int | float) for v in p.summary().values())
    assert "| x\\|y | 1 |" in p.as_markdown(limit=20)  # a pipe in a value does not break the table
    assert rows(p.by_source) == [(NONE, 12, 12)]  # no source reads as (none)
    assert_png(chart_png(p))
