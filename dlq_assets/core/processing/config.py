"""What a worker run is asked to do: batch sizes, lease, which events, limits, breaker and pacing settings.

Validated when constructed, so a bad setting fails before a connection is opened or an event is claimed.
"""

from __future__ import annotations

from dataclasses import dataclass

LEASE_MODES = ("transaction", "committed")
MAX_LEASE_SECONDS = 86_400  # a day: the lease also bounds how long a transaction may sit idle
MIN_RATE, MAX_RATE = 0.001, 1e9  # events per second: slower sleeps for more than a week per event


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
    # "transaction": the batch's row locks are its lease, one write per event; "committed": the lease
    # is written and committed before any work (visible to others, two writes per event; sql/functions/40_claims.sql).
    lease_mode: str = "transaction"
    # With nothing to claim, how long to wait for another batch in flight to end (it gives back or settles what it
    # holds: a later fragment waits for the earlier one a batch holds) before the run stops.
    peer_wait_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.lease_mode not in LEASE_MODES:
            raise ValueError(f"lease_mode must be one of {', '.join(LEASE_MODES)}")
        if not 1 <= self.min_batch_size <= self.batch_size <= self.max_batch_size <= 100_000:
            raise ValueError("need 1 <= min_batch_size <= batch_size <= max_batch_size <= 100000")
        if not 1 <= self.lease_seconds <= MAX_LEASE_SECONDS:
            raise ValueError(f"lease_seconds must be between 1 and {MAX_LEASE_SECONDS}")
        rate = self.max_events_per_second
        if rate is not None and not (MIN_RATE <= rate <= MAX_RATE):  # also refuses nan
            raise ValueError(f"max_events_per_second must be between {MIN_RATE} and {MAX_RATE:g}")
        if self.priority_max is not None and not 1 <= self.priority_max <= 10:
            raise ValueError("priority_max must be between 1 and 10")
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must not be negative")
        if not 0 <= self.peer_wait_seconds <= MAX_LEASE_SECONDS:  # also refuses nan
            raise ValueError(f"peer_wait_seconds must be between 0 and {MAX_LEASE_SECONDS}")
        budget = self.time_budget_seconds
        if budget is not None and not budget > 0:  # also refuses nan: a budget of none at all runs nothing
            raise ValueError("time_budget_seconds must be positive")
