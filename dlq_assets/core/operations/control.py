"""Hand controls: the writes an operator triggers directly, a circuit breaker's state and the release of stale leases.

Each is one call of a SQL function that does the work and checks its arguments. They run in the caller's
connection: on an autocommit connection each commits at once, which is how the CLI calls them. Plain Python: no
click, Rich or Dagster.
"""

from __future__ import annotations

from typing import Any

import psycopg

BREAKER_ACTIONS = ("open", "close", "reset")


def set_breaker(conn: psycopg.Connection[Any], name: str, action: str) -> None:
    """Open, close or reset the named breaker, creating it with the default threshold and timeout if no worker has
    yet. ``open`` holds it open for its timeout (then it half-opens as usual); ``close`` also clears the failure
    count; ``reset`` clears the failure count and times as well. The SQL function refuses any other action and
    any name a breaker may not have (``InvalidParameterValue``)."""
    conn.execute("SELECT dlq_breaker_set(%s, %s)", (name, action))


def release_stale_leases(conn: psycopg.Connection[Any]) -> int:
    """Give back the events of expired committed leases and of transaction leases whose holder is gone; each
    event is charged one failed attempt (``lease_expired``), as the workers' own release does. Events another
    transaction holds are left to it. Returns how many events were released."""
    row = conn.execute("SELECT dlq_release_dead_batches()").fetchone()
    assert row is not None  # a scalar function: always one row
    return int(row[0])
