"""ensure_month: a month's partition and the months after it, created ahead; rows already in the default
partition move into their month."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from dlq_assets.core.operations.partitions import ensure_month
from tests.reliability.conftest import VALID, insert_dead_letter


def test_a_month_and_the_months_ahead_are_created_and_early_rows_move_in(conn: psycopg.Connection) -> None:
    month = datetime(2031, 5, 1, tzinfo=UTC)
    insert_dead_letter(conn, VALID, created_at=datetime(2031, 5, 17, 12, tzinfo=UTC))  # no partition yet: default
    assert conn.execute("SELECT tableoid::regclass::text FROM dead_letter_events").fetchone() == (
        "dead_letter_events_default",
    )
    made = ensure_month(conn, month, 2)
    assert made.partition == "dead_letter_events_p203105" and made.rows == 1
    assert made.created == ["dead_letter_events_p203105", "dead_letter_events_p203106", "dead_letter_events_p203107"]
    assert {"dead_letter_events_p203105", "dead_letter_events_p203107"} <= {p[0] for p in made.partitions}
    assert conn.execute("SELECT tableoid::regclass::text FROM dead_letter_events").fetchone() == (
        "dead_letter_events_p203105",
    )
    assert ensure_month(conn, month, 2).created == []  # again: nothing to create
