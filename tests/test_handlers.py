"""The Cowrie repair handler's choices, with a claimer that stands in for the lease (no database needed here:
what the claimer's SQL does is tested against PostgreSQL in test_transaction_leases and the reliability suite)."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import UTC, datetime

from dlq_assets.handlers import ClaimedEvent, CowrieRepairHandler

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
