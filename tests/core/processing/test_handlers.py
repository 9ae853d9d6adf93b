"""The Cowrie repair handler's choices, with a claimer that stands in for the lease (what the claimer's SQL does
is tested against PostgreSQL in test_transaction_leases and the reliability suite), and the claimed event's texts."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import psycopg

from dlq_assets.core import jsonutil
from dlq_assets.core.processing import claims
from dlq_assets.core.processing.handlers import ClaimedEvent, CowrieRepairHandler
from dlq_assets.core.repair import raw_bytes_of

_CUT = '{"eventid": "cowrie.login.success", "timestamp": "2026-11-0'


def _event(event_id: int, offset: int, payload: dict[str, str], form: str, size: int) -> ClaimedEvent:
    return ClaimedEvent(
        id=event_id, created_at=datetime(2026, 11, 1, tzinfo=UTC), reason="json_parse_error", source="cowrie.json",
        source_inode="1", source_offset=offset, payload_text=json.dumps(payload), payload_checksum="",
        metadata_text=json.dumps({"payload_form": form, "record_bytes": size}), retry_count=0, priority=5,
        payload_form=form, raw_text=payload.get("raw_text"),
    )  # fmt: skip


class _EverythingWaits:
    """A claimer that finds no neighbours and says every span borders an unresolved record held elsewhere."""

    def __init__(self) -> None:
        self.seeds: list[int] = []

    def claim_neighbours_of(self, events: Sequence[ClaimedEvent], window_bytes: int) -> list[ClaimedEvent]:
        self.seeds += [e.id for e in events]
        return []

    def unresolved_next_to_any(self, spans: Sequence[tuple[str, str | None, int, int]]) -> set[int]:
        return set(range(len(spans)))


def test_a_record_no_stitch_can_use_fails_at_once_and_seeds_nothing() -> None:
    """Bytes that are not UTF-8 (or hold a NUL) are no piece of any record: no neighbour is claimed for them and
    they do not wait for one; a cut record beside them still waits for its possible other half."""
    junk = base64.b64encode(b'{"eventid": "\xff\xfe"}').decode()
    events = [
        _event(1, 0, {"raw_base64": junk}, "raw_base64", 20),
        _event(2, 100, {"raw_base64": base64.b64encode(b'{"a": "\x00"}').decode()}, "raw_base64", 11),
        _event(3, 200, {"raw_text": _CUT}, "raw_text", len(_CUT)),
    ]
    claimer = _EverythingWaits()
    outcomes = {o.event_id: o for o in CowrieRepairHandler().handle(events, claimer)}
    assert (outcomes[1].outcome, outcomes[1].message) == ("failed", "not_text")
    assert (outcomes[2].outcome, outcomes[2].message) == ("failed", "nul_byte")
    assert outcomes[3].outcome == "released"
    assert claimer.seeds == [3]


def test_raw_bytes_from_the_claimed_texts_equal_the_rendered_payload(conn: psycopg.Connection) -> None:
    """raw_bytes() takes payload::text (json) or the claim's raw_text as they are; raw_bytes_of renders them."""
    connect = {"eventid": "cowrie.session.connect", "n": Decimal("1.10"), "big": Decimal("1e2"), "s": 'é\u2028 "q"'}
    payloads = [
        (connect, "json"),
        ({"a": [1, {"b": None, "aa": True}], "": "x"}, "json"),
        ({"raw_text": '{"eventid": "x", "t": "\\u00e9", "bad": \\q}'}, "raw_text"),
    ]
    for payload, form in payloads:
        text = conn.execute("SELECT %s::jsonb::text", (jsonutil.canonical_json(payload),)).fetchone()[0]
        raw_text = payload["raw_text"] if form == "raw_text" else None
        event = _event(1, 0, {}, form, 1)
        event = ClaimedEvent(**{**event.__dict__, "payload_text": text, "raw_text": raw_text})
        assert event.raw_bytes() == raw_bytes_of(jsonutil.loads(text), form)


def test_a_claimed_row_fills_every_field_by_position(conn: psycopg.Connection) -> None:
    """The worker builds ClaimedEvent from the claim's columns positionally: their order is the fields' order."""
    raw = '{"eventid": "cowrie.login.success",'
    (event_id,) = conn.execute(
        "INSERT INTO dead_letter_events (reason, payload, metadata_json, source, source_inode, source_offset, "
        "retry_count, priority) VALUES ('json_parse_error', %s, %s, 'cowrie.json', '7', 42, 2, 3) RETURNING id",
        (json.dumps({"raw_text": raw}), json.dumps({"payload_form": "raw_text", "record_bytes": 35})),
    ).fetchone()
    row = conn.execute(f"SELECT {claims._CLAIM_COLUMNS} FROM dead_letter_events WHERE id = %s", (event_id,)).fetchone()
    event = claims._claimed(row)
    assert len(dataclasses.fields(ClaimedEvent)) == claims._CLAIMED_FIELDS == len(row) - 1
    expected = conn.execute(
        "SELECT id, created_at, payload::text, payload_checksum, metadata_json::text FROM dead_letter_events"
    ).fetchone()
    assert (event.id, event.created_at, event.payload_text, event.payload_checksum, event.metadata_text) == expected
    assert (event.reason, event.source, event.source_inode, event.source_offset) == ("json_parse_error", "cowrie.json",
                                                                                     "7", 42)  # fmt: skip
    assert (event.retry_count, event.priority, event.payload_form, event.raw_text) == (2, 3, "raw_text", raw)
    assert event.metadata == {"payload_form": "raw_text", "record_bytes": 35}
