"""The DLQ's health in numbers: what the checks, the CLI and the alerts judge against thresholds."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg


@dataclass(frozen=True)
class Thresholds:
    """Defaults for the health checks; each check reads its own from config."""

    high_retry_events: int = 0  # events with retry_count > 5 (the design's line) tolerated
    stale_locks: int = 0  # expired leases still held
    backlog_age_seconds: float = 6 * 3600  # oldest pending event
    tampered_events: int = 0  # checksum mismatches (quarantined)
    malicious_events: int = 0
    min_success_rate: float = 0.2  # resolved / processed over the recent batches (bad data keeps it well below 1)
    success_window_minutes: int = 60


@dataclass(frozen=True)
class HealthSnapshot:
    pending_events: int
    processed_events: int
    oldest_unresolved_event: datetime | None
    backlog_age_seconds: float | None
    high_retry_events: int
    locked_events: int
    stale_locks: int
    malicious_events: int
    tampered_events: int
    quarantined_events: int
    poisoned_events: int
    high_priority_events: int
    total_events: int
    open_breakers: dict[str, str]  # name -> state, for every breaker not closed
    recent_batches: int
    recent_processed: int
    recent_resolved: int

    @property
    def recent_success_rate(self) -> float | None:
        return self.recent_resolved / self.recent_processed if self.recent_processed else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recent_success_rate": self.recent_success_rate}


def snapshot(conn: psycopg.Connection[Any], *, success_window_minutes: int = 60) -> HealthSnapshot:
    """One consistent reading of dlq_health, the breakers and the recent batch metrics."""
    cur = conn.execute(
        """
        SELECT h.pending_events, h.processed_events, h.oldest_unresolved_event,
               extract(epoch FROM now() - h.oldest_unresolved_event)::double precision,
               h.high_retry_events, h.locked_events, h.stale_locks, h.malicious_events,
               (SELECT count(*) FROM dead_letter_events WHERE classification = 'tampered'),
               h.quarantined_events, h.poisoned_events, h.high_priority_events, h.total_events
          FROM dlq_health h
        """
    )
    row = cur.fetchone()
    # Open and still denying (within its timeout, or a probe out): one past its timeout lets the next worker probe.
    breakers = dict(
        conn.execute(
            "SELECT breaker_name, state FROM dlq_circuit_breaker_state "
            "WHERE state <> 'closed' AND (next_attempt_time IS NULL OR next_attempt_time > now())"
        )
    )
    batches, processed, resolved = conn.execute(
        """
        SELECT count(*), coalesce(sum(processed_count), 0), coalesce(sum(repaired_count), 0)
          FROM dlq_processing_metrics
         WHERE completed_at >= now() - make_interval(mins => %s)
        """,
        (success_window_minutes,),
    ).fetchone()
    return HealthSnapshot(*row, open_breakers=breakers, recent_batches=batches, recent_processed=int(processed),
                          recent_resolved=int(resolved))  # fmt: skip


def breaches(health: HealthSnapshot, limits: Thresholds) -> dict[str, str]:
    """Every threshold the snapshot breaks, with the reason an operator reads."""
    found: dict[str, str] = {}
    if health.high_retry_events > limits.high_retry_events:
        found["high_retry_events"] = f"{health.high_retry_events} events retried more than 5 times"
    if health.stale_locks > limits.stale_locks:
        found["stale_locks"] = f"{health.stale_locks} expired leases still held"
    if health.backlog_age_seconds is not None and health.backlog_age_seconds > limits.backlog_age_seconds:
        found["backlog_age"] = f"oldest pending event is {health.backlog_age_seconds / 3600:.1f} h old"
    if health.open_breakers:
        found["breaker_open"] = ", ".join(f"{name} is {state}" for name, state in sorted(health.open_breakers.items()))
    if health.tampered_events > limits.tampered_events:
        found["tampered_events"] = f"{health.tampered_events} events failed their checksum"
    if health.malicious_events > limits.malicious_events:
        found["malicious_events"] = f"{health.malicious_events} events classified malicious"
    rate = health.recent_success_rate
    if rate is not None and rate < limits.min_success_rate:
        found["success_rate"] = f"recent batches resolved {rate:.0%} of what they processed"
    return found
