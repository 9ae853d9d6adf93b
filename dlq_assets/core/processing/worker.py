"""The processing worker: claim a batch under a lease, verify, repair, write, complete — in that order.

Per batch: claim; verify each checksum (a mismatch is quarantined, never processed); hand the rest to the
reason's handler, consulting the circuit breaker for every event; then write the targets to ``raw_events``
(idempotent), complete the whole batch in one fenced call and record its metrics row, atomically.

The lease is a transaction by default (sql/0011): the batch is claimed ``FOR UPDATE SKIP LOCKED`` inside the
transaction that completes it, and its ids are journalled from a second connection, so a worker that dies loses
its row locks at once and the next claim counts the attempt. With ``lease_mode="committed"`` the lease is
written and committed first (sql/0003) and expires if the worker dies. Either way a crash before the commit
applies nothing, and the events are claimed again. SIGTERM finishes the event at hand, releases the rest and
exits.
"""

from __future__ import annotations

import gc
import hashlib
import math
import multiprocessing
import os
import queue
import resource
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import psycopg

from dlq_assets.core import jsonutil
from dlq_assets.core.db import JSON_TEXTS_SQL, bigint_array, database_url, json_texts, text_array
from dlq_assets.core.processing.handlers import (
    ClaimedEvent,
    Handler,
    HandlerRegistry,
    Outcome,
    Target,
    default_registry,
)

PROCESSING_METHOD = "python_worker"
LEASE_MODES = ("transaction", "committed")
_CLAIM_COLUMNS = (  # the payload form and a raw record's text read here, not decoded from JSON per event
    "id, created_at, reason, source, source_inode, source_offset, payload::text, payload_checksum, "
    "coalesce(metadata_json, '{}'::jsonb)::text, retry_count, priority, metadata_json ->> 'payload_form', "
    "CASE WHEN metadata_json ->> 'payload_form' = 'raw_text' AND jsonb_typeof(payload -> 'raw_text') = 'string' "
    "THEN payload ->> 'raw_text' END, processing_lock"
)
_CLAIMED_FIELDS = 13  # the columns before processing_lock, one per ClaimedEvent field


# Failures of the system around the events, not of an event: the connection, resources (disk, memory,
# connections), an operator or a timeout cancelling a statement, a lock timeout, a deadlock (class 08, 53, 55, 57,
# 58, 40: OperationalError), a missing privilege, a read-only server, a schema that lost its table or function.
# A value the target refuses (a data or integrity error, a trigger's RAISE) is the event's.
_INFRASTRUCTURE_ERRORS = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.UndefinedFunction,
)


def is_infrastructure_failure(exc: BaseException) -> bool:
    """An infrastructure failure opens the breaker and costs no event an attempt (docs/guarantees.md)."""
    return isinstance(exc, _INFRASTRUCTURE_ERRORS)


def ensure_breaker(
    conn: psycopg.Connection[Any], name: str, threshold: int | None = None, timeout_seconds: int | None = None
) -> None:
    """Create the breaker with its defaults; a threshold or timeout given is applied too, which takes the owner's
    or security_admin's rights (processors record outcomes, they do not configure the breaker)."""
    if threshold is None and timeout_seconds is None:
        conn.execute("SELECT dlq_breaker_ensure(%s)", (name,))
    else:
        conn.execute("SELECT dlq_breaker_configure(%s, %s, %s)", (name, threshold, timeout_seconds))


def _claim_rows(conn: psycopg.Connection[Any], call: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """``_CLAIM_COLUMNS`` of a claim function's rows, fetched in binary: the same values, loaded with less work
    than their text (1.33 vs 1.65 ms per 1,000)."""
    return conn.execute(f"SELECT {_CLAIM_COLUMNS} FROM {call}", params, binary=True).fetchall()


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int = 1000
    min_batch_size: int = 1000
    max_batch_size: int = 5000
    target_batch_seconds: float = 2.0  # adaptive sizing aims each batch at this duration
    lease_seconds: int = 1800
    priority_max: int | None = None
    reason: str | None = None
    limit: int | None = None  # stop after claiming this many events
    time_budget_seconds: float | None = None
    breaker_name: str = "dlq_processing"
    breaker_threshold: int | None = None  # None: keep what the breaker row says (default 5)
    breaker_timeout_seconds: int | None = None
    max_events_per_second: float | None = None
    pause_every: int | None = None  # the design's rate limit: pause_seconds every N events
    pause_seconds: float = 0.01
    # "transaction": the batch's row locks are its lease, one write per event (sql/0011); "committed": the lease
    # is written and committed before any work (visible to others, two writes per event; sql/0003).
    lease_mode: str = "transaction"

    def __post_init__(self) -> None:
        if self.lease_mode not in LEASE_MODES:
            raise ValueError(f"lease_mode must be one of {', '.join(LEASE_MODES)}")
        if not 1 <= self.min_batch_size <= self.batch_size <= self.max_batch_size <= 100_000:
            raise ValueError("need 1 <= min_batch_size <= batch_size <= max_batch_size <= 100000")
        if self.lease_seconds < 1:
            raise ValueError("lease_seconds must be positive")
        if self.priority_max is not None and not 1 <= self.priority_max <= 10:
            raise ValueError("priority_max must be between 1 and 10")
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must not be negative")


@dataclass
class ProcessReport:
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    batches: int = 0
    claimed: int = 0
    resolved: int = 0
    retried: int = 0
    poisoned: int = 0
    quarantined: int = 0
    released: int = 0
    not_owned: int = 0
    breaker_denied: bool = False
    infrastructure_error: str | None = None  # what stopped the run and opened the breaker; no attempt was charged
    stopped_by_signal: bool = False
    seconds: float = 0.0
    strategies: Counter[str] = field(default_factory=Counter)
    batch_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # the largest worker process's peak resident memory

    @property
    def failed(self) -> int:
        return self.retried + self.poisoned

    @property
    def processed(self) -> int:
        """Events that got an outcome (released ones were handed back untouched)."""
        return self.claimed - self.released - self.not_owned

    @property
    def events_per_second(self) -> float:
        return (self.claimed - self.released) / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: ProcessReport) -> None:
        for name in ("batches", "claimed", "resolved", "retried", "poisoned", "quarantined", "released", "not_owned"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.peak_rss_mb = max(self.peak_rss_mb, other.peak_rss_mb)
        self.breaker_denied |= other.breaker_denied
        self.infrastructure_error = self.infrastructure_error or other.infrastructure_error
        self.stopped_by_signal |= other.stopped_by_signal
        self.strategies.update(other.strategies)
        self.batch_seconds.extend(other.batch_seconds)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(failed=self.failed, processed=self.processed, events_per_second=round(self.events_per_second, 1))
        data["strategies"] = dict(self.strategies)
        return data


class RateLimiter:
    """At most ``max_per_second`` events, and a pause every ``pause_every`` events (the design's rule)."""

    def __init__(self, max_per_second: float | None, pause_every: int | None, pause_seconds: float) -> None:
        self.max_per_second, self.pause_every, self.pause_seconds = max_per_second, pause_every, pause_seconds
        self.count = 0
        self.started = time.monotonic()

    @property
    def active(self) -> bool:
        return bool(self.pause_every or self.max_per_second)

    def tick(self) -> None:
        self.count += 1
        if self.pause_every and self.count % self.pause_every == 0:
            time.sleep(self.pause_seconds)
        if self.max_per_second:
            ahead = self.count / self.max_per_second - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)


def next_batch_size(current: int, seconds: float, config: WorkerConfig) -> int:
    """Move the batch size toward the one that takes ``target_batch_seconds``, halfway each time, in bounds."""
    if seconds <= 0:
        return current
    wanted = current * config.target_batch_seconds / seconds
    return max(config.min_batch_size, min(config.max_batch_size, round((current + wanted) / 2)))


class _Stop:
    """Set by SIGTERM/SIGINT (main thread only) or by a caller; checked between events."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.by_signal = False

    def install(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, frame: FrameType | None) -> None:
            self.by_signal = True
            self.event.set()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, prev in previous.items():
                signal.signal(sig, prev)

        return restore


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """A batch allocates tens of thousands of short-lived, acyclic objects (freed by reference counting): the
    cycle collector's default threshold (700) ran it every few dozen events, 12% of the per-event time."""
    previous = gc.get_threshold()
    gc.set_threshold(50_000, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; a forked worker's counts the pages it shares with its parent)."""
    try:
        with open("/proc/self/status") as status:
            kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the same peak, in KiB, where /proc is not mounted
    return round(kb / 1024, 1)


def _claimed(row: Sequence[Any]) -> ClaimedEvent:
    # positionally (_CLAIM_COLUMNS are the dataclass's fields in order, the lease last): a third of the keyword call
    return ClaimedEvent(*row[:_CLAIMED_FIELDS])


def _checksum_ok(event: ClaimedEvent) -> bool:
    # payload::text is the canonical form, so its SHA-256 is the checksum taken at insert, unless tampered.
    return hashlib.sha256(event.payload_text.encode("utf-8")).hexdigest() == event.payload_checksum


class Worker:
    """One worker process's loop over the backlog."""

    def __init__(
        self, url: str | None = None, config: WorkerConfig | None = None, registry: HandlerRegistry | None = None
    ) -> None:
        self.url = database_url(url)
        self.config = config or WorkerConfig()
        self.registry = registry or default_registry()
        self.stop = _Stop()
        self.worker_name = f"{os.uname().nodename}:{os.getpid()}"
        self._in_flight: _BatchSession | None = None  # the batch being worked, for giving it back on a failure
        self._probe: uuid.UUID | None = None  # the half-open probe it holds, if it is one

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> ProcessReport:
        report = ProcessReport()
        restore = self.stop.install()
        started = time.monotonic()
        limiter = RateLimiter(self.config.max_events_per_second, self.config.pause_every, self.config.pause_seconds)
        try:
            with (
                _fewer_collections(),
                psycopg.connect(self.url, autocommit=True) as conn,
                self._journal_connection() as journal,
                _Heartbeat(self.url, self.config, conn if journal else None) as heartbeat,
            ):
                try:  # once connected: a failure to connect at all is raised as it is (nothing was claimed)
                    self._loop(conn, journal, heartbeat, report, limiter, started)
                except Exception as exc:  # the batch's transaction, if any, has rolled back on its way out
                    if not is_infrastructure_failure(exc):
                        raise
                    self._infrastructure_failed(report, exc)
        finally:
            restore()
            report.seconds = time.monotonic() - started
            report.peak_rss_mb = peak_rss_mb()
            report.stopped_by_signal = self.stop.by_signal
        return report

    def _loop(
        self,
        conn: psycopg.Connection[Any],
        journal: psycopg.Connection[Any] | None,
        heartbeat: _Heartbeat,
        report: ProcessReport,
        limiter: RateLimiter,
        started: float,
    ) -> None:
        """Batches until the backlog, the budget or the limit ends, or a signal stops the run."""
        batch_size = self.config.batch_size
        # A batch transaction silent for longer than its lease is ended by the server (heartbeats ping).
        conn.execute(f"SET idle_in_transaction_session_timeout = {self.config.lease_seconds * 1000}")
        # Claimed rows' created_at load as UTC datetimes, the same instants: psycopg converts a named zone
        # (the server's Etc/UTC, say) through zoneinfo, 0.75 µs a value against 0.16 for UTC.
        conn.execute("SET TimeZone = 'UTC'")
        config = self.config
        ensure_breaker(conn, config.breaker_name, config.breaker_threshold, config.breaker_timeout_seconds)
        while not self.stop.event.is_set():
            if self.config.time_budget_seconds and time.monotonic() - started >= self.config.time_budget_seconds:
                break
            remaining = None if self.config.limit is None else self.config.limit - report.claimed
            if remaining is not None and remaining <= 0:
                break
            size = batch_size if remaining is None else min(batch_size, remaining)
            batch_started = time.monotonic()
            processed = report.processed
            claimed = self._run_batch(conn, journal, size, report, limiter, heartbeat)
            if claimed == 0 or report.processed == processed:
                break  # nothing left, or all handed back (waiting for what others hold): claiming again spins
            elapsed = time.monotonic() - batch_started
            report.batch_seconds.append(elapsed)
            batch_size = next_batch_size(batch_size, elapsed, self.config) if claimed >= size else batch_size

    @contextmanager
    def _journal_connection(self) -> Iterator[psycopg.Connection[Any] | None]:
        """The second connection a transaction lease journals its batches through (commits on its own)."""
        if self.config.lease_mode != "transaction":
            yield None
            return
        with psycopg.connect(self.url, autocommit=True) as journal:
            yield journal

    def _run_batch(
        self,
        conn: psycopg.Connection[Any],
        journal: psycopg.Connection[Any] | None,
        size: int,
        report: ProcessReport,
        limiter: RateLimiter,
        heartbeat: _Heartbeat,
    ) -> int:
        self._in_flight = self._probe = None
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        decision, probe = conn.execute(
            "SELECT decision, probe FROM dlq_breaker_acquire(%s)", (self.config.breaker_name,)
        ).fetchone()
        if decision == "deny":
            report.breaker_denied = True
            self._record_metrics(conn, report.session_id, started_at, t0, breaker_triggered=True)
            return 0
        if decision == "probe":
            size = 1  # exactly one event goes through a half-open breaker
        self._probe = probe
        if journal:  # give back dead batches in a transaction of its own: it must outlive ours, and precede it
            journal.execute("SELECT dlq_release_dead_batches()")
        with conn.transaction() if journal else nullcontext():  # a transaction lease lasts as long as this
            if journal:
                lease = uuid.uuid4()
                rows = _claim_rows(
                    conn, "dlq_claim_batch(%s, %s, %s, %s)", (lease, size, self.config.priority_max, self.config.reason)
                )
            else:
                rows = _claim_rows(
                    conn,
                    "dlq_claim_events(%s, %s, %s, %s, %s)",
                    (size, self.config.lease_seconds, self.config.priority_max, self.config.reason, self.worker_name),
                )
                lease = rows[0][-1] if rows else None
            if not rows or lease is None:
                if probe is not None:  # nothing to probe with: give the probe back by closing on an empty success
                    conn.execute("SELECT dlq_breaker_record(%s, 1, 0, %s)", (self.config.breaker_name, probe))
                return 0
            events = sorted((_claimed(r) for r in rows), key=lambda e: (e.priority, e.created_at, e.id))
            session = self._in_flight = _BatchSession(conn, lease, self.config.lease_seconds, journal, self.worker_name)
            session.journal([e.id for e in events])
            with heartbeat.holding(lease):
                outcomes, breaker_tripped, successes, tail_failures = self._decide(events, session, limiter)
                neighbours = {e.id for e in session.neighbours + session.tampered}
                unused = {o.event_id for o in outcomes if o.event_id in neighbours and o.outcome == "released"}
                write_failures = self._write_and_complete(
                    conn, lease, outcomes, report, started_at, t0, breaker_tripped, uncounted=unused
                )
        if write_failures:
            successes, tail_failures = 0, tail_failures + write_failures
        conn.execute(
            "SELECT dlq_breaker_record(%s, %s, %s, %s)", (self.config.breaker_name, successes, tail_failures, probe)
        )
        report.batches += 1
        report.claimed += len(events) + len(neighbours) - len(unused)
        return len(events)

    def _infrastructure_failed(self, report: ProcessReport, exc: Exception) -> None:
        """Give the batch back without charging an attempt, open the breaker, and stop the run with the error.

        Through a fresh connection: the batch's own may be broken. A transaction lease rolled back already: only
        its journal entry goes. A committed lease's events are released by completion. What cannot be done (the
        server is gone) is said in the report; the batch then waits for its lease to end, charged as a dead
        worker's would be."""
        message = f"{type(exc).__name__}: {str(exc).strip()}"
        session = self._in_flight
        try:
            with psycopg.connect(self.url, autocommit=True) as fresh:
                if session is not None and session.journal_conn is not None:
                    fresh.execute("SELECT dlq_forget_batch(%s)", (session.lease,))
                elif session is not None:
                    self._complete(fresh, session.lease, [Outcome(i, "released") for i in session.held])
                fresh.execute("SELECT dlq_breaker_trip(%s, %s)", (self.config.breaker_name, self._probe))
            message += "; the breaker is open"
        except psycopg.Error as also:
            message += f" (and then {type(also).__name__}: {str(also).strip()}: a batch held waits for its lease)"
        report.infrastructure_error = message

    def _decide(
        self, events: list[ClaimedEvent], session: _BatchSession, limiter: RateLimiter
    ) -> tuple[list[Outcome], bool, int, int]:
        """Outcomes for a batch, the breaker consulted per event: it stops the batch at the threshold."""
        (failure_count, threshold) = session.conn.execute(
            "SELECT failure_count, failure_threshold FROM dlq_circuit_breaker_state WHERE breaker_name = %s",
            (self.config.breaker_name,),
        ).fetchone()
        outcomes: list[Outcome] = []
        successes = tail_failures = 0
        tripped = False
        ordered: list[ClaimedEvent] = []
        for event in events:
            if _checksum_ok(event):
                ordered.append(event)
            else:
                outcomes.append(Outcome(event.id, "quarantined", message="payload checksum mismatch"))
        handled = self._handle(ordered, session)
        outcomes += [Outcome(e.id, "quarantined", message="payload checksum mismatch") for e in session.tampered]
        consecutive = failure_count if failure_count else 0
        tick = limiter.tick if limiter.active else None
        stopping = self.stop.event.is_set
        for event in ordered + session.neighbours:
            outcome = handled.get(event.id) or Outcome(event.id, "released")
            if tripped or stopping():
                outcomes.append(Outcome(event.id, "released"))
                continue
            outcomes.append(outcome)
            if outcome.outcome == "resolved":
                consecutive = tail_failures = 0
                successes += 1
            elif outcome.systemic_failure:
                consecutive += 1
                tail_failures += 1
                tripped = consecutive >= threshold
            if tick:
                tick()
        return outcomes, tripped, successes, tail_failures

    def _handle(self, events: list[ClaimedEvent], session: _BatchSession) -> dict[int, Outcome]:
        """Each handler gets all of its events at once (stitching must see fragments of every reason)."""
        groups: dict[int, tuple[Handler, list[ClaimedEvent]]] = {}
        handled: dict[int, Outcome] = {}
        for event in events:
            handler = self.registry.handler_for(event.reason)
            if handler is None:
                handled[event.id] = Outcome(event.id, "failed", error_class="handler_missing")
            elif (group := groups.get(id(handler))) is None:
                groups[id(handler)] = (handler, [event])
            else:
                group[1].append(event)
        for handler, group in groups.values():
            taken = len(session.neighbours), len(session.tampered)
            try:
                # In a transaction lease, a savepoint: a handler's failed statement leaves the batch usable. A
                # committed lease's connection autocommits: nothing to protect, and no transaction left open.
                with session.conn.transaction() if session.journal_conn is not None else nullcontext():
                    results = handler.handle(group, session)
            except Exception as exc:  # a handler bug fails its events (recorded), it does not kill the worker
                if is_infrastructure_failure(exc):
                    raise
                del session.neighbours[taken[0] :], session.tampered[taken[1] :]  # their claims rolled back
                message = f"{type(exc).__name__}: {exc}"
                results = [Outcome(e.id, "failed", error_class="handler_error", message=message) for e in group]
            handled.update({o.event_id: o for o in results})
        return handled

    def _write_and_complete(
        self,
        conn: psycopg.Connection[Any],
        lease: uuid.UUID,
        outcomes: list[Outcome],
        report: ProcessReport,
        started_at: datetime,
        t0: float,
        breaker_tripped: bool,
        uncounted: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> int:
        """Complete, write targets, record metrics in one transaction; returns how many target writes failed.

        Completion goes first and fences: only events this lease really resolved reach the target, so a worker
        whose lease expired and was taken over writes nothing (the rows it would write roll back with it)."""
        write_failures = 0
        targets: list[Target] = []
        try:
            with conn.transaction():
                states = self._complete(conn, lease, outcomes)
                resolved = [o for o in outcomes if o.target is not None and states.get(o.event_id) == "resolved"]
                targets = [o.target for o in resolved]
                targets += [target for o in resolved if o.more for target in o.more]  # a split record's others
                _write_targets(conn, targets)
                counts = _counts(states, uncounted)
                self._record_metrics(conn, report.session_id, started_at, t0, breaker_triggered=breaker_tripped,
                                     counts=counts)  # fmt: skip
        except psycopg.Error as exc:
            if is_infrastructure_failure(exc):
                raise
            # The target refused the batch (a value, a constraint, a trigger): find the events whose targets it
            # refuses, one by one, and fail only those (systemic); the rest are completed and written again.
            refused = self._refused_targets(conn, outcomes)
            write_failures = len(refused)
            outcomes = [
                Outcome(o.event_id, "failed", error_class="target_write_failed",
                        message=f"target write failed: {refused[o.event_id]}")
                if o.event_id in refused
                else o
                for o in outcomes
            ]  # fmt: skip
            with conn.transaction():
                states = self._complete(conn, lease, outcomes)
                resolved = [o for o in outcomes if o.target is not None and states.get(o.event_id) == "resolved"]
                _write_targets(conn, [t for o in resolved for t in (o.target, *o.more)])
                counts = _counts(states, uncounted)
                self._record_metrics(conn, report.session_id, started_at, t0, breaker_triggered=True,
                                     counts=counts)  # fmt: skip
        report.resolved += counts["resolved"]
        report.retried += counts["retry_scheduled"]
        report.poisoned += counts["poisoned"]
        report.quarantined += counts["quarantined"]
        report.released += counts["released"]
        report.not_owned += counts["not_owned"]
        report.strategies.update(o.method for o in outcomes if o.method and states.get(o.event_id) == "resolved")
        return write_failures

    def _refused_targets(self, conn: psycopg.Connection[Any], outcomes: list[Outcome]) -> dict[int, str]:
        """Event id -> the target's error, for each event whose targets the target refuses: each written alone in
        a savepoint, and every write rolled back after (only ever on a batch the target refused)."""
        refused: dict[int, str] = {}
        with conn.transaction(force_rollback=True):
            for o in outcomes:
                if o.target is None:
                    continue
                try:
                    with conn.transaction():
                        _write_targets(conn, [o.target, *o.more])
                except psycopg.Error as exc:
                    if is_infrastructure_failure(exc):
                        raise
                    refused[o.event_id] = str(exc).strip()
        return refused

    def _complete(self, conn: psycopg.Connection[Any], lease: uuid.UUID, outcomes: list[Outcome]) -> dict[int, str]:
        ids, kinds, methods, error_classes, messages, _, _ = zip(*outcomes, strict=True) if outcomes else ((),) * 7
        rows = conn.execute(
            "SELECT event_id, final_state "
            "FROM dlq_complete_batch(%s, %s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[])",
            (lease, bigint_array(ids), text_array(kinds), text_array(methods), text_array(error_classes),
             text_array(messages)),
        ).fetchall()  # fmt: skip
        return dict(rows)

    def _record_metrics(
        self,
        conn: psycopg.Connection[Any],
        session_id: str,
        started_at: datetime,
        t0: float,
        *,
        breaker_triggered: bool,
        counts: Counter[str] | None = None,
    ) -> None:
        counts = counts or Counter()
        batch_size = counts.total()
        processed = batch_size - counts["released"] - counts["not_owned"]
        duration_ms = round((time.monotonic() - t0) * 1000)
        conn.execute(
            """
            INSERT INTO dlq_processing_metrics (
                processing_session_id, processing_method, batch_size, processed_count, repaired_count, failed_count,
                skipped_count, quarantined_count, poisoned_count, processing_duration_ms, avg_processing_time_ms,
                circuit_breaker_name, circuit_breaker_triggered, started_at, completed_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (
                session_id,
                PROCESSING_METHOD,
                batch_size,
                processed,
                counts["resolved"],
                counts["retry_scheduled"] + counts["poisoned"],
                counts["released"] + counts["not_owned"],
                counts["quarantined"],
                counts["poisoned"],
                duration_ms,
                round(duration_ms / processed, 3) if processed else None,
                self.config.breaker_name,
                breaker_triggered,
                started_at,
                max(datetime.now(UTC), started_at),
            ),
        )


def _counts(states: dict[int, str], uncounted: set[int]) -> Counter[str]:
    """Final states counted, without the neighbours leased for stitching and given back unused: never this batch's
    work."""
    if not uncounted:
        return Counter(states.values())
    return Counter(state for event_id, state in states.items() if event_id not in uncounted)


class _BatchSession:
    """What a handler may do with the batch's lease: take neighbours; the worker heartbeats through it."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        lease: uuid.UUID,
        lease_seconds: int,
        journal_conn: psycopg.Connection[Any] | None = None,
        worker_name: str | None = None,
    ) -> None:
        self.conn, self.lease, self.lease_seconds = conn, lease, lease_seconds
        self.journal_conn, self.worker_name = journal_conn, worker_name
        self.neighbours: list[ClaimedEvent] = []
        self.tampered: list[ClaimedEvent] = []  # neighbours whose checksum failed: quarantined, never handed on
        self.held: list[int] = []  # every event this lease holds (a transaction lease writes no lock column)

    def journal(self, ids: list[int]) -> None:
        """Record events a transaction lease holds, committed at once, so a crash is counted (sql/0011)."""
        self.held.extend(ids)
        if self.journal_conn is not None and ids:
            self.journal_conn.execute(
                "SELECT dlq_journal_batch(%s, %s::bigint[], %s)", (self.lease, bigint_array(ids), self.worker_name)
            )

    def claim_neighbours_of(self, events: Sequence[ClaimedEvent], window_bytes: int) -> list[ClaimedEvent]:
        """One statement for the whole batch (one per event cost more than the batch), contiguous records only.
        Neighbours are verified like the batch's own events: a tampered one is kept back for quarantine."""
        ids = [e.id for e in events if e.source is not None and e.source_offset is not None]
        if not ids:
            return []
        rows = _claim_rows(
            self.conn,
            "dlq_claim_fragment_chains(%s, %s::bigint[], %s, %s)",
            (self.lease, bigint_array(ids), window_bytes, self.lease_seconds),
        )
        found = [_claimed(r) for r in rows]
        self.journal([e.id for e in found])
        verified: list[ClaimedEvent] = []
        for event in found:
            (verified if _checksum_ok(event) else self.tampered).append(event)
        self.neighbours.extend(verified)
        return verified

    def unresolved_next_to_any(self, spans: Sequence[tuple[str, str | None, int, int]]) -> set[int]:
        """Indexes of the spans with an unresolved dead letter outside this lease right before or after them."""
        if not spans:
            return set()
        sources, inodes, starts, ends = zip(*spans, strict=True)
        rows = self.conn.execute(
            """
            SELECT s.n - 1 FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[])
                   WITH ORDINALITY AS s(source, inode, start_at, end_at, n)
             CROSS JOIN LATERAL (  -- per span, two probes of the partial (source, source_offset) index: the
                   -- unresolved dead letter right after it, and the nearest one before it (records never overlap,
                   -- so only that one can end right where the span starts)
                   SELECT 1 FROM (
                        (SELECT d.* FROM dead_letter_events d
                          WHERE d.source = s.source AND d.source_inode IS NOT DISTINCT FROM s.inode
                            AND d.source_offset BETWEEN s.end_at + 1 AND s.end_at + 2  -- a range: PostgreSQL
                            AND NOT d.resolved  -- 15 scans the whole source for an IN list here (sql/0015)
                          ORDER BY d.source_offset LIMIT 1)
                        UNION ALL
                        (SELECT d.* FROM dead_letter_events d
                          WHERE d.source = s.source AND d.source_inode IS NOT DISTINCT FROM s.inode
                            AND d.source_offset < s.start_at AND d.source_offset >= s.start_at - %s
                            AND NOT d.resolved
                          ORDER BY d.source_offset DESC LIMIT 1)) d
                    WHERE (d.source_offset IN (s.end_at + 1, s.end_at + 2)
                           OR d.source_offset + dlq_record_bytes(d.metadata_json) + 1 IN (s.start_at, s.start_at - 1))
                      AND d.quarantined_at IS NULL AND d.processing_lock IS DISTINCT FROM %s
                      AND d.classification IS DISTINCT FROM 'malicious'  -- never claimed: nothing to wait for
                      AND d.id <> ALL (%s::bigint[])
                    LIMIT 1) found
            """,
            (
                text_array(sources),
                text_array(inodes),
                bigint_array(starts),
                bigint_array(ends),
                64 * 1024,
                self.lease,
                bigint_array(self.held),
            ),
        ).fetchall()
        return {n for (n,) in rows}


class _Heartbeat:
    """Extends the current batch's lease from its own thread every lease/3 seconds, however long a handler
    or a write takes. A committed lease is extended on the heartbeat's own connection, opened only when a batch
    first runs that long; a transaction lease by a statement on the batch's connection, which keeps the server
    from ending the transaction as idle."""

    def __init__(self, url: str, config: WorkerConfig, batch_conn: psycopg.Connection[Any] | None = None) -> None:
        self.url, self.lease_seconds, self.batch_conn = url, config.lease_seconds, batch_conn
        self.lease: uuid.UUID | None = None
        self.beats = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlq-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def holding(self, lease: uuid.UUID) -> Iterator[None]:
        with self._lock:
            self.lease = lease
        try:
            yield
        finally:
            with self._lock:
                self.lease = None

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.wait(self.lease_seconds / 3):
                with self._lock:
                    lease = self.lease
                    if lease is None:
                        continue
                    if self.batch_conn is not None:
                        self.batch_conn.execute("SELECT 1")
                    else:
                        conn = conn or psycopg.connect(self.url, autocommit=True)
                        conn.execute("SELECT dlq_heartbeat(%s, %s)", (lease, self.lease_seconds))
                    self.beats += 1
        finally:
            if conn is not None:
                conn.close()


_INSERT_TARGETS = f"""
    INSERT INTO raw_events (source, source_inode, source_offset, eventid, session, src_ip, event_timestamp,
                            payload, payload_checksum, dlq_event_id, repair_strategy, partial)
    SELECT t.source, t.inode, t.off, t.payload->>'eventid', t.payload->>'session',
           (t.payload->>'src_ip')::inet, (t.payload->>'timestamp')::timestamptz, t.payload,
           coalesce(t.checksum, dlq_payload_checksum(t.payload)), t.dlq_id, t.strategy,
           t.strategy = 'truncation_closed'
      FROM (SELECT u.source, u.inode, u.off, u.payload::jsonb AS payload, u.checksum, u.dlq_id, u.strategy
              FROM unnest(%s::text[], %s::text[], %s::bigint[], {JSON_TEXTS_SQL}, %s::text[], %s::bigint[],
                          %s::text[]) AS u(source, inode, off, payload, checksum, dlq_id, strategy)
            OFFSET 0) t  -- each payload parsed once: flattened, every reference above would cast it again
"""


def _write_targets(conn: psycopg.Connection[Any], targets: list[Target]) -> int:
    """Payloads go as the JSON text at hand (jsonb canonicalises it), joined unescaped (see JSON_TEXTS_SQL);
    a checksum not known yet is taken from the stored payload, which is what the checksum covers.

    Idempotent by position: a plain INSERT in a savepoint first, and only when a position is in raw_events
    already (a redrive, a duplicate dead letter) the batch again with ON CONFLICT DO NOTHING. ON CONFLICT makes
    every row a speculative insertion: 3 ms more per 1,000 rows, paid for the rare conflict."""
    if not targets:
        return 0
    events, sources, inodes, offsets, dlq_ids, strategies, texts, checksums = zip(*targets, strict=True)
    if None in texts:
        texts = tuple(jsonutil.canonical_json(e) if t is None else t for e, t in zip(events, texts, strict=True))
    params = (text_array(sources), text_array(inodes), bigint_array(offsets), json_texts(texts),
              text_array(checksums), bigint_array(dlq_ids), text_array(strategies))  # fmt: skip
    try:
        with conn.transaction():
            return conn.execute(_INSERT_TARGETS, params).rowcount
    except psycopg.errors.UniqueViolation:
        conflict = "ON CONFLICT ON CONSTRAINT raw_events_source_position DO NOTHING"
        return conn.execute(_INSERT_TARGETS + conflict, params).rowcount


# -- several workers ------------------------------------------------------------------------------------------
def _worker_main(url: str, config: WorkerConfig, results: Any) -> None:
    try:
        results.put(Worker(url, config).run().as_dict())
    except BaseException as exc:  # reported once, by the parent, as one line: no traceback from the child
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None


def process(url: str | None = None, config: WorkerConfig | None = None, *, workers: int = 1) -> ProcessReport:
    """Process the backlog with ``workers`` processes (one in-process when 1); returns the combined report."""
    config = config or WorkerConfig()
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if workers == 1:
        return Worker(url, config).run()
    url = database_url(url)
    share = None if config.limit is None else math.ceil(config.limit / workers)
    context = multiprocessing.get_context(_start_method())
    results = context.Queue()
    procs = [
        context.Process(target=_worker_main, args=(url, _with_limit(config, share), results), daemon=True)
        for _ in range(workers)
    ]
    started = time.monotonic()
    for proc in procs:
        proc.start()

    def forward(signum: int, frame: FrameType | None) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if in_main else None
    reports: list[dict[str, Any]] = []
    try:
        while len(reports) < len(procs):
            try:
                reports.append(results.get(timeout=1))
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break  # a worker died without a report (killed): the others' reports still count
        for proc in procs:
            proc.join()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if errors := [r["error"] for r in reports if "error" in r]:
        raise RuntimeError(f"a worker failed: {errors[0]}")
    combined = ProcessReport()
    for data in reports:
        combined.merge(_report_from(data))
    combined.seconds = time.monotonic() - started
    if any(p.exitcode not in (0, None) for p in procs):
        raise RuntimeError(f"a worker exited with {[p.exitcode for p in procs]}")
    return combined


def _with_limit(config: WorkerConfig, limit: int | None) -> WorkerConfig:
    return config if limit is None else WorkerConfig(**{**asdict(config), "limit": limit})


def _report_from(data: dict[str, Any]) -> ProcessReport:
    report = ProcessReport(session_id=data["session_id"])
    for name in ("batches", "claimed", "resolved", "retried", "poisoned", "quarantined", "released", "not_owned"):
        setattr(report, name, data[name])
    report.breaker_denied = data["breaker_denied"]
    report.infrastructure_error = data["infrastructure_error"]
    report.stopped_by_signal = data["stopped_by_signal"]
    report.strategies = Counter(data["strategies"])
    report.batch_seconds = list(data["batch_seconds"])
    report.seconds = data["seconds"]
    report.peak_rss_mb = data["peak_rss_mb"]
    return report


def _start_method() -> str:
    """fork when this process runs no other thread: a forked worker starts in milliseconds with its modules
    already imported, where spawn re-imports them (0.3 s per worker, 5% of a 100k-event run). With other threads
    (a Dagster run, say) spawn: a fork copies any lock another thread holds, and nothing would release it."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return "fork"
    return "spawn"
