"""The batch loop's pace: a rate limit on events, and the batch size adapted toward a target duration.

Both depend on the configuration and the clock only, not on the database, and are tested on their own.
"""

from __future__ import annotations

import time

from dlq_assets.core.processing.config import WorkerConfig


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
