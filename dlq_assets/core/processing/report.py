"""What a worker run reports: the outcome counts, batch durations, peak memory, and what stopped it.

Plain values, so a worker process sends its report to the parent as a dict and the parent merges them.
"""

from __future__ import annotations

import resource
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


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


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; a forked worker's counts the pages it shares with its parent)."""
    try:
        with open("/proc/self/status") as status:
            kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the same peak, in KiB, where /proc is not mounted
    return round(kb / 1024, 1)
