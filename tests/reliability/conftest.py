"""Shared tools of the reliability suite: the ledger, worker and ingest subprocesses, backend probes.

The ledger is the suite's one definition of "nothing lost, nothing applied twice": taken before and after a
scenario (as superuser, in one snapshot), it holds every event's idempotency key, checksum and state across
dead_letter_events and dlq_poison_events, every key ever accepted, and every raw_events position and target.

Sizes scale with ``DLQ_RELIABILITY_SCALE`` (default 1: the whole suite well under two minutes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.types.json import Jsonb

SCALE = max(1, int(os.environ.get("DLQ_RELIABILITY_SCALE", "1")))
SETTLED = frozenset({"pending", "resolved", "quarantined", "poisoned"})
STITCH_WINDOW = 1 << 20  # a stitched target starts at most this far before a fragment it covers (MAX_INPUT_BYTES)
VALID = {
    "eventid": "cowrie.session.connect",
    "timestamp": "2024-01-15T10:30:00.123456Z",
    "session": "3f2a9c0b1d4e",
    "src_ip": "203.0.113.10",
}


@dataclass(frozen=True)
class Entry:
    event_id: int
    checksum: str
    payload_ok: bool  # the payload still hashes to its checksum
    state: str  # pending | leased | resolved | quarantined | poisoned (or an impossible mix, named)
    source: str | None
    inode: str | None
    offset: int | None
    method: str | None


@dataclass(frozen=True)
class Ledger:
    events: dict[str, Entry]  # live rows of both tables, by idempotency key
    duplicate_keys: list[str]  # keys held by more than one live row
    tombstones: dict[str, int]  # every key ever accepted -> its event id
    raw_positions: Counter[tuple[str, str, int]]
    targets: Counter[int]  # dlq_event_id -> raw_events rows
    stitched: dict[tuple[str, str], list[int]]  # (source, inode) -> offsets of stitched targets

    def states(self) -> Counter[str]:
        return Counter(e.state for e in self.events.values())


_EVENTS = """
SELECT idempotency_key, id, payload_checksum, dlq_payload_checksum(payload) = payload_checksum,
       CASE WHEN resolved AND quarantined_at IS NOT NULL THEN 'resolved+quarantined'
            WHEN resolved AND processing_lock IS NOT NULL THEN 'resolved+leased'
            WHEN resolved THEN 'resolved' WHEN quarantined_at IS NOT NULL THEN 'quarantined'
            WHEN processing_lock IS NOT NULL THEN 'leased' ELSE 'pending' END,
       source, source_inode, source_offset, resolution_method
  FROM dead_letter_events
UNION ALL
SELECT idempotency_key, id, payload_checksum, dlq_payload_checksum(payload) = payload_checksum,
       CASE WHEN quarantined_at IS NOT NULL OR resolved THEN 'poisoned+other' ELSE 'poisoned' END,
       source, source_inode, source_offset, resolution_method
  FROM dlq_poison_events
"""


def take_ledger(url: str) -> Ledger:
    """One consistent reading (REPEATABLE READ) of every event, key and target; ``url`` must be a superuser's."""
    with psycopg.connect(url) as snap:
        snap.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        events: dict[str, Entry] = {}
        duplicates: list[str] = []
        for key, *row in snap.execute(_EVENTS):
            if key in events:
                duplicates.append(key)
            events[key] = Entry(*row)
        tombstones = dict(snap.execute("SELECT idempotency_key, event_id FROM dlq_idempotency_keys").fetchall())
        positions: Counter[tuple[str, str, int]] = Counter()
        targets: Counter[int] = Counter()
        stitched: dict[tuple[str, str], list[int]] = {}
        for source, inode, offset, dlq_id, strategy in snap.execute(
            "SELECT source, source_inode, source_offset, dlq_event_id, repair_strategy FROM raw_events"
        ):
            positions[(source, inode, offset)] += 1
            if dlq_id is not None:
                targets[dlq_id] += 1
            if strategy == "stitch":
                stitched.setdefault((source, inode), []).append(offset)
    return Ledger(events, duplicates, tombstones, positions, targets, stitched)


def _covered_by_stitch(after: Ledger, entry: Entry) -> bool:
    offsets = after.stitched.get((entry.source or "", entry.inode or ""), [])
    return entry.offset is not None and any(entry.offset - STITCH_WINDOW <= o <= entry.offset for o in offsets)


def assert_ledger_holds(
    before: Ledger,
    after: Ledger,
    *,
    new_keys_ok: bool = False,
    retired_ok: bool = False,
    tampered: frozenset[str] = frozenset(),
) -> dict[str, int]:
    """Nothing lost, nothing changed, every event in exactly one settled state, nothing applied twice.

    ``retired_ok``: resolved events may have been deleted by retention, their keys left as tombstones.
    ``tampered``: keys whose payloads were changed behind their checksum; each must be quarantined.
    Returns the counts of the after-states (plus ``retired``).
    """
    assert after.duplicate_keys == [], f"keys in more than one place: {after.duplicate_keys[:10]}"
    assert after.tombstones.keys() >= after.events.keys(), "a live event without its idempotency key"
    lost = before.events.keys() - after.events.keys()
    retired = {k for k in lost if k in after.tombstones} if retired_ok else set()
    assert lost == retired, f"{len(lost - retired)} events lost, e.g. {sorted(lost - retired)[:5]}"
    unresolved = [
        before.events[k].event_id
        for k in retired
        if after.targets[before.events[k].event_id] != 1 and not _covered_by_stitch(after, before.events[k])
    ]
    assert unresolved == [], f"retired without a target row, so never resolved: {unresolved[:10]}"
    changed = sorted(k for k, e in before.events.items() if e.checksum != after.events.get(k, e).checksum)
    assert changed == [], f"checksums changed: {changed[:5]}"
    added = after.events.keys() - before.events.keys()
    assert new_keys_ok or not added, f"{len(added)} events appeared from nowhere"
    unsettled = Counter(e.state for e in after.events.values() if e.state not in SETTLED)
    assert not unsettled, f"events outside the known states: {dict(unsettled)}"
    mismatched = {k for k, e in after.events.items() if not e.payload_ok}
    assert mismatched == tampered & after.events.keys(), f"unexpected checksum mismatches: {sorted(mismatched)[:5]}"
    slipped = {after.events[k].event_id: (after.events[k].state, after.events[k].method) for k in tampered}
    assert {i: s for i, s in slipped.items() if s[0] != "quarantined"} == {}, "tampered events not quarantined"
    doubled = {p: n for p, n in after.raw_positions.items() if n > 1}
    assert doubled == {}, f"raw_events positions applied twice: {list(doubled)[:5]}"
    twice = {i: n for i, n in after.targets.items() if n > 1}
    assert twice == {}, f"dead letters written to the target twice: {list(twice)[:5]}"
    missing = [
        e.event_id
        for e in after.events.values()
        if e.state == "resolved"
        and after.targets[e.event_id] != 1
        and not (e.method == "repair:stitch" and _covered_by_stitch(after, e))
    ]
    assert missing == [], f"resolved without a target row: {missing[:10]}"
    live = {e.event_id: e.state for e in after.events.values()}
    gone = set(after.tombstones.values()) - live.keys()  # retired by retention
    orphans = sorted(i for i in after.targets if live.get(i) != "resolved" and i not in gone)
    assert orphans == [], f"target rows of events that are not resolved: {[(i, live.get(i)) for i in orphans[:10]]}"
    return {**after.states(), "retired": len(retired)}


def assert_processed_once_per_lease(conn: psycopg.Connection[Any]) -> None:
    """No lease took an event twice, no lease decided an event twice, and only a lease that claimed it did."""
    events = "(SELECT id, processing_attempts, error_history FROM dead_letter_events UNION ALL " \
             "SELECT id, processing_attempts, error_history FROM dlq_poison_events)"  # fmt: skip
    twice_claimed = conn.execute(
        f"SELECT e.id FROM {events} e, jsonb_array_elements(e.processing_attempts) a "
        "GROUP BY e.id, a ->> 'lease' HAVING count(*) > 1"
    ).fetchall()
    assert twice_claimed == []
    twice_decided = conn.execute(
        f"SELECT e.id FROM {events} e, jsonb_array_elements(e.error_history) h WHERE h ? 'lease' "
        "GROUP BY e.id, h ->> 'lease' HAVING count(*) > 1"
    ).fetchall()
    assert twice_decided == []
    foreign = conn.execute(
        f"SELECT e.id FROM {events} e, jsonb_array_elements(e.error_history) h WHERE h ? 'lease' "
        "AND NOT e.processing_attempts @> jsonb_build_array(jsonb_build_object('lease', h -> 'lease'))"
    ).fetchall()
    assert foreign == []


# --- URLs, backends ------------------------------------------------------------------------------------------


def with_params(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def with_password(url: str, password: str) -> str:
    """The same URL with a password (a trust-auth server ignores it)."""
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.split(':')[0]}:{password}@{host}"))


def backends(conn: psycopg.Connection[Any], app: str, *, waiting_on_lock: bool = False) -> list[int]:
    """Sessions of ``app`` now (``conn`` must be autocommit: a transaction sees one pg_stat_activity snapshot)."""
    return [
        pid
        for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND (NOT %s OR wait_event_type = 'Lock')",
            (app, waiting_on_lock),
        )
    ]


def wait_until(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return result


# --- worker and ingest subprocesses --------------------------------------------------------------------------

# A real worker whose handler first prints the ids it holds, then waits: for a line on stdin ("stdin") or N
# seconds. One handler takes every reason (dispatching to the default registry), so there is one gate per batch.
WORKER_SCRIPT = """
import sys, time
from dlq_assets.core.processing.handlers import HandlerRegistry, default_registry
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.worker import Worker

url, lease, batch, gate, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
base = default_registry()

class Gated:
    name = "gated"

    def handle(self, events, claimer):
        print("claimed", *(e.id for e in events), flush=True)
        if gate == "stdin":
            sys.stdin.readline()
        else:
            time.sleep(float(gate))
        groups = {}
        for event in events:
            handler = base.handler_for(event.reason)
            groups.setdefault(id(handler), (handler, []))[1].append(event)
        return [o for handler, group in groups.values() for o in handler.handle(group, claimer)]

config = WorkerConfig(batch_size=batch, min_batch_size=1, max_batch_size=batch, lease_seconds=lease, lease_mode=mode)
report = Worker(url, config, HandlerRegistry(default=Gated())).run()
print("done", report.resolved, flush=True)
sys.exit(3 if report.infrastructure_error else 0)
"""


@dataclass
class Victim:
    """A worker subprocess stopped in its first batch's handler; ``ids`` are the events its lease holds."""

    proc: subprocess.Popen[str]
    ids: list[int]
    app: str

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def reap(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode


def start_worker(
    url: str,
    *,
    gate: str = "stdin",
    lease: int = 1,
    batch: int = 40,
    app: str = "dlq-victim",
    lease_mode: str = "transaction",
) -> Victim:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WORKER_SCRIPT,
            with_params(url, application_name=app),
            *map(str, (lease, batch)),
            gate,
            lease_mode,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # a killed worker's traceback is expected noise
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("claimed"), f"the worker claimed nothing: {line!r}"
    return Victim(proc, [int(i) for i in line.split()[1:]], app)


@contextmanager
def stopped_at(url: str, step: str, victim: Victim) -> Iterator[None]:
    """Let ``victim`` run from its handler into ``step`` and hold it there with a lock until the block ends.

    handler: it stays in its handler. target_write: raw_events is locked, so its INSERT waits inside the
    batch transaction. complete (committed leases only: a transaction lease holds its rows itself): its rows are
    locked, so dlq_complete_batch waits. commit: the metrics table is locked, so the batch transaction's last
    statement waits, everything else done.
    """
    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as watcher:
        if step == "target_write":
            holder.execute("LOCK TABLE raw_events IN SHARE MODE")
        elif step == "commit":
            holder.execute("LOCK TABLE dlq_processing_metrics IN SHARE MODE")
        elif step == "complete":
            holder.execute("SELECT 1 FROM dead_letter_events WHERE id = ANY (%s) FOR UPDATE", (victim.ids,))
        if step != "handler":
            victim.go()
            wait_until(lambda: backends(watcher, victim.app, waiting_on_lock=True), f"the worker to block in {step}")
        try:
            yield
        finally:
            holder.rollback()


INGEST_SCRIPT = """
import sys
from dlq_assets.core.intake.ingest import ingest_paths
ingest_paths([sys.argv[2]], url=sys.argv[1], batch_size=int(sys.argv[3]))
"""


def start_ingest(url: str, path: str, batch_size: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", INGEST_SCRIPT, url, path, str(batch_size)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


# --- data ----------------------------------------------------------------------------------------------------


def insert_dead_letter(conn: psycopg.Connection[Any], payload: Any, **columns: Any) -> int:
    values = {"reason": "target_unavailable", "payload": Jsonb(payload), **columns}
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    return conn.execute(
        f"INSERT INTO dead_letter_events ({names}) VALUES ({marks}) RETURNING id", list(values.values())
    ).fetchone()[0]
