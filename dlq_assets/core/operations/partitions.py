"""Monthly partitions of ``dead_letter_events``: a month and the months after it created ahead of time.

Rows that already sit in the default partition for a new month move into it (``dlq_ensure_partitions``), so
creating a partition never fails on data that arrived early. Plain Python: no Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg


@dataclass(frozen=True)
class MonthPartitions:
    partition: str  # the month's partition
    rows: int  # dead letters created in that month
    created: list[str]  # partitions this call created (the month and those ahead of it)
    partitions: list[tuple[str, int | None, str]]  # every partition: name, estimated rows (None: not analysed), size


def ensure_month(conn: psycopg.Connection[Any], month: datetime, months_ahead: int) -> MonthPartitions:
    """Create the partition of ``month`` (a timezone-aware datetime) and of ``months_ahead`` months after it."""
    created = [r[0] for r in conn.execute("SELECT * FROM dlq_ensure_partitions(%s, %s)", (month, months_ahead))]
    name, rows = conn.execute(
        "SELECT dlq_partition_name(%s), (SELECT count(*) FROM dead_letter_events"
        "                                 WHERE created_at >= %s AND created_at < %s + interval '1 month')",
        (month, month, month),
    ).fetchone()  # type: ignore[misc]  # a SELECT without FROM: always one row
    partitions = conn.execute(
        "SELECT partition_name, estimated_rows, pg_size_pretty(total_bytes) FROM dlq_partitions ORDER BY 1"
    ).fetchall()
    return MonthPartitions(name, rows, created, partitions)
