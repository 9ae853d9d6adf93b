"""The processing worker: claim a batch under a lease, verify, repair, write, complete — in that order.

Per batch: claim; verify each checksum (a mismatch is quarantined, never processed); hand the rest to the
reason's handler, consulting the circuit breaker for every event; then write the targets to ``raw_events``
(idempotent), complete the whole batch in one fenced call and record its metrics row, atomically.

The lease is a transaction by default (sql/functions/40_claims.sql): the batch is claimed ``FOR UPDATE SKIP
LOCKED`` inside the transaction that completes it, and its ids are journalled from a second connection, so a
worker that dies loses its row locks at once and the next claim counts the attempt. With
``lease_mode="committed"`` the lease is written and committed first (the same file) and expires if the worker
dies. Either way a crash before the commit
applies nothing, and the events are claimed again. SIGTERM finishes the event at hand, releases the rest and
exits.

This module holds the Worker and its batch loop; ``pool.process`` runs one or several of them.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TypeVar

import psycopg

from dlq_assets.core.db import bigint_array, database_url, text_array
from dlq_assets.core.processing.breaker import ensure_breaker, is_infrastructure_failure
from dlq_assets.core.processing.claims import _BatchSession, _checksum_ok, _claim_rows, _claimed, _Journal
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.handlers import (
    ClaimedEvent,
    Handler,
    HandlerRegistry,
    Outcome,
    Target,
    default_registry,
)
from dlq_assets.core.processing.heartbeat import _Heartbeat
from dlq_assets.core.processing.pacing import RateLimiter, next_batch_size
from dlq_assets.core.processing.report import ProcessReport, peak_rss_mb
from dlq_assets.core.processing.targets import _write_targets

_T = TypeVar("_T")

PROCESSING_METHOD = "python_worker"
# The target's deferred constraints and constraint triggers check each write when its statement ends, inside the
# refusal handling, not at COMMIT, where one event's refusal would fail the whole batch (every event of it then
# charged when its lease ended). Set in every transaction or savepoint that writes: a savepoint rolled back undoes it.
_IMMEDIATE = "SET CONSTRAINTS ALL IMMEDIATE"
_INFRASTRUCTURE_AFTER = 3  # infrastructure refusals of a batch's first targets, none taken: the system's failure
# Other batches in flight: journalled transaction leases whose holder lives, committed leases not yet expired.
_BATCHES_IN_FLIGHT = """
    SELECT lease FROM dlq_batch_leases WHERE dlq_lease_holder(lease) <> 0
    UNION
    SELECT processing_lock FROM dead_letter_events WHERE processing_lock IS NOT NULL AND lock_expires_at > now()
"""


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
    """A batch allocates tens of thousands of short-lived, acyclic objects (freed by reference counting): at
    the cycle collector's default threshold (700) it runs every few dozen events, 12% of the per-event time."""
    previous = gc.get_threshold()
    gc.set_threshold(50_000, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)


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
                        self._forget_refused_journal(exc)
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
        journal: _Journal | None,
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
        # A transaction lease's completion reads the journal committed after its claim: each statement's own
        # snapshot, whatever the database's default isolation (dlq_claim_batch refuses any other).
        conn.execute("SET default_transaction_isolation = 'read committed'")
        config = self.config
        ensure_breaker(conn, config.breaker_name, config.breaker_threshold, config.breaker_timeout_seconds)
        claimed_again = False
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
                # Nothing claimable, or all handed back (waiting for a fragment another batch holds). Another batch
                # in flight gives back or settles what it holds as it ends: claim again then. A claim that met a
                # batch as it committed skipped what that batch gave back: one more claim once none is in flight.
                wait = self.config.peer_wait_seconds
                if self.config.time_budget_seconds:
                    wait = min(wait, self.config.time_budget_seconds - (time.monotonic() - started))
                if self._peer_batch_ended(conn, wait):
                    continue
                if claimed == 0 and not claimed_again:
                    claimed_again = True
                    continue
                break
            claimed_again = False
            elapsed = time.monotonic() - batch_started
            report.batch_seconds.append(elapsed)
            batch_size = next_batch_size(batch_size, elapsed, self.config) if claimed >= size else batch_size

    def _peer_batch_ended(self, conn: psycopg.Connection[Any], wait: float) -> bool:
        """Whether one of the other batches in flight ended within ``wait`` seconds (False at once when none is).
        Two workers holding adjacent dead letters apart: the later one's is handed back while the earlier one's is
        worked; stopping then would leave it unattempted until the next run."""
        in_flight = {lease for (lease,) in conn.execute(_BATCHES_IN_FLIGHT)}
        deadline, pause = time.monotonic() + wait, 0.002
        while in_flight and time.monotonic() < deadline and not self.stop.event.wait(pause):
            pause = min(pause * 2, 0.1)
            if not in_flight <= {lease for (lease,) in conn.execute(_BATCHES_IN_FLIGHT)}:
                return True
        return False

    @contextmanager
    def _journal_connection(self) -> Iterator[_Journal | None]:
        """The second connection a transaction lease journals its batches through (commits on its own)."""
        if self.config.lease_mode != "transaction":
            yield None
            return
        with psycopg.connect(self.url, autocommit=True) as journal:
            yield _Journal(journal)

    def _run_batch(
        self,
        conn: psycopg.Connection[Any],
        journal: _Journal | None,
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
            session = self._in_flight = _BatchSession(conn, lease, self.config.lease_seconds, journal, self.worker_name)
            session.journal([r[0] for r in rows])  # sent; committed while the events are built and verified
            events = sorted((_claimed(r) for r in rows), key=lambda e: (e.priority, e.created_at, e.id))
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
        if session is not None:
            with suppress(psycopg.Error):  # refused or lost: nothing of it to forget, or forgotten below
                session.settle()  # an entry still in flight would land after the forget below
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

    def _forget_refused_journal(self, exc: Exception) -> None:
        """A batch stopped by its journal's refusal: the entries the journal did take are forgotten, not charged
        (no holder died, and no event is at fault)."""
        session = self._in_flight
        if session is None or not session.journal_failed(exc):
            return
        with suppress(psycopg.Error), psycopg.connect(self.url, autocommit=True) as fresh:
            fresh.execute("SELECT dlq_forget_batch(%s)", (session.lease,))

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
        # Every event on record before any handler sees one: a worker an event kills is charged for it. Collected
        # after the claim's checksums, not before them: the journal's commit overlaps that work.
        session.settle()
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
                if is_infrastructure_failure(exc) or session.journal_failed(exc):
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
        """Write targets, complete, record metrics in one transaction; returns how many target writes failed.

        A committed lease completes first, in a savepoint, and that fences: only events the lease still held are
        resolved, and only those reach the target, so a worker whose lease expired and was taken over writes
        nothing (the rows it would write roll back with it). A transaction lease is fenced by its row locks
        already, and completes at the top level of the transaction that claimed, after the targets: an UPDATE
        from a savepoint of rows the transaction locked gives each row a MultiXact as its xmax (the lock's
        transaction and the savepoint's, resolved at every later read of the row), and PostgreSQL never takes such
        a row version as surely dead, so every claim would fetch each resolved row's stale index entry from the
        heap until VACUUM."""
        if self.config.lease_mode == "transaction":
            outcomes, refused, _ = self._until_accepted(conn, outcomes, lambda o, _: _write_targets(conn, _targets(o)))
            states = self._complete(conn, lease, outcomes)
            unheld = [o.event_id for o in outcomes if o.target is not None and states.get(o.event_id) != "resolved"]
            if unheld:  # the row locks make this impossible; if it happens, the raise rolls the targets back
                raise RuntimeError(f"events {unheld[:10]} were written but the lease does not hold them")
            counts = _counts(states, uncounted)
            self._record_metrics(conn, report.session_id, started_at, t0,
                                 breaker_triggered=breaker_tripped or bool(refused), counts=counts)  # fmt: skip
        else:

            def complete_and_write(outcomes: list[Outcome], retry: bool) -> tuple[dict[int, str], Counter[str]]:
                states = self._complete(conn, lease, outcomes)
                _write_targets(conn, _targets(outcomes, states))
                counts = _counts(states, uncounted)
                self._record_metrics(conn, report.session_id, started_at, t0,
                                     breaker_triggered=breaker_tripped or retry, counts=counts)  # fmt: skip
                return states, counts

            outcomes, refused, (states, counts) = self._until_accepted(conn, outcomes, complete_and_write)
        report.resolved += counts["resolved"]
        report.retried += counts["retry_scheduled"]
        report.poisoned += counts["poisoned"]
        report.quarantined += counts["quarantined"]
        report.released += counts["released"]
        report.not_owned += counts["not_owned"]
        report.strategies.update(o.method for o in outcomes if o.method and states.get(o.event_id) == "resolved")
        return len(refused)

    def _until_accepted(
        self, conn: psycopg.Connection[Any], outcomes: list[Outcome], step: Callable[[list[Outcome], bool], _T]
    ) -> tuple[list[Outcome], dict[int, str], _T]:
        """``step(outcomes, retry)`` in a savepoint; if it fails (the target refuses a value, a constraint, a
        trigger, whatever the error), the events whose targets the target refuses fail (systemic) and the step runs
        again with the rest. Returns the outcomes it ran with, the refused events and the step's result."""
        try:
            with conn.transaction():
                conn.execute(_IMMEDIATE)
                return outcomes, {}, step(outcomes, False)
        except psycopg.Error:
            if conn.broken or conn.closed:
                raise
        refused = self._refused_targets(conn, outcomes)
        outcomes = _fail_refused(outcomes, refused)
        with conn.transaction():
            conn.execute(_IMMEDIATE)
            return outcomes, refused, step(outcomes, True)

    def _refused_targets(self, conn: psycopg.Connection[Any], outcomes: list[Outcome]) -> dict[int, str]:
        """Event id -> the target's error, for each event whose targets the target refuses: each written alone in
        a savepoint, and every write rolled back after (only ever on a batch the target refused).

        A refusal is its events' whatever its error while the target takes other events' writes: a trigger or a
        row security policy may raise any SQLSTATE (a privilege error, a lock timeout) for one row, and taken as
        the system's, that event would never be charged and would head every batch. A target that takes none of
        them and refuses with an infrastructure failure (a missing privilege, a read-only server, a full disk) is
        the system's: raised, after the first three such refusals, or after the last target."""
        refused: dict[int, str] = {}
        failures: list[psycopg.Error] = []  # the infrastructure failures met while the target took nothing
        taken = False
        with conn.transaction(force_rollback=True):
            conn.execute(_IMMEDIATE)
            for o in outcomes:
                if o.target is None:
                    continue
                try:
                    with conn.transaction():
                        _write_targets(conn, [o.target, *o.more])
                    taken = True
                except psycopg.Error as exc:
                    if conn.broken or conn.closed:
                        raise
                    if not taken and is_infrastructure_failure(exc):
                        failures.append(exc)
                        if len(failures) == _INFRASTRUCTURE_AFTER:
                            raise exc
                    refused[o.event_id] = str(exc).strip()
        if failures and not taken:
            raise failures[-1]
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


def _targets(outcomes: list[Outcome], states: dict[int, str] | None = None) -> list[Target]:
    """Every target of the outcomes that carry one (a split record's others too); with ``states``, only of events the
    completion resolved."""
    return [
        t
        for o in outcomes
        if o.target is not None and (states is None or states.get(o.event_id) == "resolved")
        for t in (o.target, *o.more)
    ]


def _fail_refused(outcomes: list[Outcome], refused: dict[int, str]) -> list[Outcome]:
    """The outcomes with each event whose targets the target refused failed instead (target_write_failed)."""
    return [
        Outcome(o.event_id, "failed", error_class="target_write_failed",
                message=f"target write failed: {refused[o.event_id]}")
        if o.event_id in refused
        else o
        for o in outcomes
    ]  # fmt: skip


def _counts(states: dict[int, str], uncounted: set[int]) -> Counter[str]:
    """Final states counted, without the neighbours leased for stitching and given back unused: never this batch's
    work."""
    if not uncounted:
        return Counter(states.values())
    return Counter(state for event_id, state in states.items() if event_id not in uncounted)
