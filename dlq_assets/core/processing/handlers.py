"""Handlers turn claimed dead letters into outcomes; they are pluggable per reason.

A handler sees the whole claimed batch (stitching needs neighbours) and returns one ``Outcome`` per event.
It never writes: the worker writes every ``target`` to ``raw_events`` and completes the batch in one call.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, NamedTuple, Protocol

from dlq_assets.core import jsonutil
from dlq_assets.core.cowrie import validate_event
from dlq_assets.core.repair import (
    STRATEGIES,
    UNSTITCHABLE,
    Fragment,
    RepairResult,
    raw_bytes_of,
    repair_record,
    stitch_fragments,
)

SYSTEMIC_ERROR_CLASSES = frozenset({"target_write_failed", "handler_error"})
_METHODS = {strategy: f"repair:{strategy}" for strategy in STRATEGIES}


def _method(strategy: str) -> str:
    """The resolution method a repair strategy records: one string per strategy, not one built per event."""
    return _METHODS.get(strategy) or f"repair:{strategy}"


@dataclass
class ClaimedEvent:
    """One claimed dead letter, read-only by convention (not frozen: a frozen dataclass costs 1 µs per event)."""

    id: int
    created_at: datetime
    reason: str
    source: str | None
    source_inode: str | None
    source_offset: int | None
    payload_text: str  # exactly payload::text, the canonical form the checksum covers
    payload_checksum: str
    metadata_text: str  # metadata_json::text, decoded only when asked for (most events never need it)
    retry_count: int
    priority: int
    payload_form: str | None = None  # metadata's payload_form, read by the claim
    raw_text: str | None = None  # a raw_text payload's record, read by the claim from the same row as payload_text

    @cached_property
    def payload(self) -> Any:
        return jsonutil.loads(self.payload_text, encodable=True)  # decoded from the server's UTF-8

    @cached_property
    def metadata(self) -> dict[str, Any]:
        return json.loads(self.metadata_text) if self.metadata_text else {}

    def raw_bytes(self) -> bytes:
        """The record's bytes (see ``raw_bytes_of``), from the texts at hand where the claim gave them."""
        if self.raw_text is not None:
            return self.raw_text.encode("utf-8")
        if self.payload_form == "json":  # payload::text is the canonical form raw_bytes_of would render
            return self.payload_text.encode("utf-8")
        return raw_bytes_of(self.payload, self.payload_form)

    def raw_record(self) -> bytes | str:
        """What ``repair_record`` takes: raw text as text (no parse of the wrapper with Decimals, no encoding)."""
        if self.payload_form == "raw_text":  # the claim gave its text unless the value is no string
            return self.raw_text if self.raw_text is not None else json.loads(self.payload_text)["raw_text"]
        return self.raw_bytes()


class Target(NamedTuple):
    """A repaired or replayed event to write to raw_events at its original position (a tuple: cheap to build)."""

    event: dict[str, Any]
    source: str
    source_inode: str
    source_offset: int
    dlq_event_id: int
    strategy: str
    text: str | None = None  # JSON text of ``event`` when at hand: written as it is, not rendered again


class Outcome(NamedTuple):
    """What a handler decided for one event (a tuple: one is built per event)."""

    event_id: int
    outcome: str  # resolved | failed | quarantined | released
    method: str | None = None
    error_class: str | None = None
    message: str | None = None
    target: Target | None = None
    more: tuple[Target, ...] = ()  # further events of one dead letter (a split record), written with ``target``

    @property
    def systemic_failure(self) -> bool:
        return self.outcome == "failed" and self.error_class in SYSTEMIC_ERROR_CLASSES


class Claimer(Protocol):
    """Lets a handler add more events to the batch's lease (neighbouring fragments for stitching)."""

    def claim_neighbours_of(self, events: Sequence[ClaimedEvent], window_bytes: int) -> list[ClaimedEvent]:
        """Free dead letters contiguous with ``events`` in their files (within the window), in one round trip."""
        ...

    def unresolved_next_to_any(self, spans: Sequence[tuple[str, str | None, int, int]]) -> set[int]:
        """Indexes of the ``(source, inode, start, end)`` spans with an unresolved dead letter outside this lease
        right before ``start``."""
        ...


class Handler(Protocol):
    name: str

    def handle(self, events: Sequence[ClaimedEvent], claimer: Claimer) -> list[Outcome]: ...


def _target(
    event: ClaimedEvent,
    repaired: dict[str, Any],
    strategy: str,
    text: str | None = None,
    at: int = 0,
    part: int = 0,
) -> Target:
    """Where the event goes: its original position (``at`` bytes into the record), or a DLQ-scoped one for dead
    letters without a source (the record's first event at the dead letter's id, further ones of a split record
    under its id at their byte offsets)."""
    if event.source is None or event.source_offset is None:
        if part:
            return Target(repaired, "dlq-repair", str(event.id), at, event.id, strategy, text)
        return Target(repaired, "dlq-repair", "", event.id, event.id, strategy, text)
    return Target(repaired, event.source, event.source_inode or "", event.source_offset + at, event.id, strategy, text)


def _resolved(event: ClaimedEvent, result: RepairResult) -> Outcome:
    """A repaired record's outcome: its event, and a split record's further events, each at its own position."""
    strategy = result.strategy or ""
    target = _target(event, result.event or {}, strategy, result.text, at=result.at)
    if not result.more:
        return Outcome(event.id, "resolved", _method(strategy), None, None, target)
    more = tuple(
        _target(event, part.event or {}, strategy, part.text, at=part.at, part=k)
        for k, part in enumerate(result.more, 1)
    )
    return Outcome(event.id, "resolved", _method(strategy), None, None, target, more)


@dataclass
class CowrieRepairHandler:
    """Repairs Cowrie JSON: as-is, tokenizer fix, then stitching fragments of one source back together."""

    name: str = "cowrie_repair"
    stitch_window_bytes: int = 8 * 1024  # a pretty-printed Cowrie event spans 1-4 KB

    def handle(self, events: Sequence[ClaimedEvent], claimer: Claimer) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        unrepaired: list[tuple[ClaimedEvent, str]] = []
        for event in events:
            result = repair_record(event.raw_record())
            if result.event is not None and result.strategy is not None:
                outcomes[event.id] = _resolved(event, result)
            elif result.reason in UNSTITCHABLE:  # no stitch can use it: nothing to look for or wait for
                outcomes[event.id] = Outcome(event.id, "failed", error_class="unrepairable", message=result.reason)
            else:
                unrepaired.append((event, result.reason or "unrepairable"))
        outcomes.update(self._stitch(unrepaired, claimer))
        left = [(event, why) for event, why in unrepaired if event.id not in outcomes]
        waiting = _waiting_for_fragments([e for e, _ in left], claimer)
        for event, why in left:
            if event.id in waiting:
                # The fragment before its chain is unresolved outside this lease (another worker holds it, or
                # just gave it back): hand this one back untouched rather than fail what may still stitch. Only
                # the later chain waits: two workers each holding one side of a pair would otherwise hand both
                # back, batch after batch, and stop with neither attempted. The earlier one is tried (and, when
                # it fails, claimed as a neighbour by the later one's next attempt).
                outcomes[event.id] = Outcome(event.id, "released")
            else:
                outcomes[event.id] = Outcome(event.id, "failed", error_class="unrepairable", message=why)
        return list(outcomes.values())

    def _stitch(self, unrepaired: list[tuple[ClaimedEvent, str]], claimer: Claimer) -> dict[int, Outcome]:
        by_source: dict[tuple[str, str], dict[int, ClaimedEvent]] = defaultdict(dict)
        for event, _ in unrepaired:
            if event.source is not None and _is_position(event.source_offset):
                by_source[(event.source, event.source_inode or "")][event.id] = event
        if by_source:
            seeds = [event for members in by_source.values() for event in members.values()]
            for neighbour in claimer.claim_neighbours_of(seeds, self.stitch_window_bytes):
                by_source[(neighbour.source or "", neighbour.source_inode or "")].setdefault(neighbour.id, neighbour)
        outcomes: dict[int, Outcome] = {}
        for members in by_source.values():
            fragments = [Fragment(e.id, e.source_offset or 0, e.raw_bytes()) for e in members.values()]
            for stitched in stitch_fragments(fragments):
                first = min((members[k] for k in stitched.keys), key=lambda e: e.source_offset or 0)
                target = _target(first, stitched.event, stitched.strategy, stitched.text)
                for key in stitched.keys:
                    outcomes[key] = Outcome(
                        key, "resolved", _method(stitched.strategy), target=target if key == first.id else None
                    )
            extra = {e.id for e in members.values()} - {e.id for e, _ in unrepaired}
            for key in extra - set(outcomes):  # neighbours we leased but could not use go back untouched
                outcomes[key] = Outcome(key, "released")
        return outcomes


def _is_length(value: object) -> bool:
    """A record length as dlq_record_bytes (10_cowrie.sql) reads one: metadata_json is writable by a processor."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**15


def _is_position(offset: int | None) -> bool:
    """A byte offset a file can have, as dlq_claim_fragment_chains takes one (below 2^62): a forged one is no
    fragment's, and the arithmetic on it stays within bigint."""
    return offset is not None and 0 <= offset < 2**62


def _waiting_for_fragments(events: list[ClaimedEvent], claimer: Claimer) -> set[int]:
    """Ids of events whose chain of adjacent records (within this batch) follows an unresolved record elsewhere."""
    spans = {
        e.id: (e.source_offset, e.source_offset + e.metadata["record_bytes"])
        for e in events
        if e.source is not None and _is_position(e.source_offset) and _is_length(e.metadata.get("record_bytes"))
    }
    by_source: dict[tuple[str, str | None], list[ClaimedEvent]] = defaultdict(list)
    for event in events:
        if event.id in spans:
            by_source[(event.source or "", event.source_inode)].append(event)
    chains: list[list[ClaimedEvent]] = []
    for members in by_source.values():
        members.sort(key=lambda e: spans[e.id][0])
        chains.append([members[0]])
        for event in members[1:]:
            if spans[event.id][0] - spans[chains[-1][-1].id][1] in (1, 2):
                chains[-1].append(event)  # the next record in the file: same chain
            else:
                chains.append([event])
    edges = [(c[0].source or "", c[0].source_inode, spans[c[0].id][0], spans[c[-1].id][1]) for c in chains]
    return {e.id for n in claimer.unresolved_next_to_any(edges) for e in chains[n]}


@dataclass
class ReplayHandler:
    """Replays a payload that was valid all along (the failure was transient): validate and write."""

    name: str = "replay"

    def handle(self, events: Sequence[ClaimedEvent], claimer: Claimer) -> list[Outcome]:
        outcomes = []
        for event in events:
            payload = event.payload
            result = validate_event(payload)
            if result.valid:
                target = _target(event, payload, "replay", event.payload_text)
                outcomes.append(Outcome(event.id, "resolved", "replay", target=target))
            else:
                outcomes.append(
                    Outcome(event.id, "failed", error_class="invalid_event", message="; ".join(result.errors))
                )
        return outcomes


TRANSIENT_REASONS = ("transient_failure", "target_unavailable", "timeout", "connection_error")


@dataclass
class HandlerRegistry:
    """Which handler takes which reason; ``default`` takes every reason not listed (None: poison them)."""

    by_reason: dict[str, Handler] = field(default_factory=dict)
    default: Handler | None = None

    def handler_for(self, reason: str) -> Handler | None:
        return self.by_reason.get(reason, self.default)


def default_registry() -> HandlerRegistry:
    replay = ReplayHandler()
    return HandlerRegistry(by_reason=dict.fromkeys(TRANSIENT_REASONS, replay), default=CowrieRepairHandler())
