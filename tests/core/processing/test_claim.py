"""Claiming a batch: leases, ordering, and a plan that stays on the index as the backlog grows."""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg
import pytest

BACKLOG = 120_000


def fill_backlog(conn: psycopg.Connection, n: int) -> None:
    """n unresolved events spread over three months, 10% resolved, mixed priorities (set-based, fast). A third of
    them in each of the three (UTC) months before this one, a minute apart, whatever the date: counted back from
    now, early in a month the current partition held a few hundred rows, which PostgreSQL rightly scanned rather
    than probed (the plan tests failed on the 2nd of December)."""
    conn.execute("SELECT dlq_ensure_partitions(now() - interval '3 months', 2)")
    conn.execute(
        """
        INSERT INTO dead_letter_events (reason, payload, priority, created_at, resolved, resolved_at, source,
                                        source_offset)
        SELECT 'json_parse_error',
               jsonb_build_object('raw_text', '{"eventid": "cowrie.session.connect", "n": ' || g || ','),
               1 + g %% 10,
               date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                   - make_interval(months => 1 + g %% 3) + make_interval(secs => g / 3 * 60),
               g %% 10 = 5,
               CASE WHEN g %% 10 = 5 THEN now() END,
               '/var/log/cowrie/cowrie.json',
               g * 200
          FROM generate_series(1, %s) AS g
        """,
        (n,),
    )
    conn.execute("ANALYZE dead_letter_events")


def claimed_plans(conn: psycopg.Connection, statement: str, params: tuple[Any, ...]) -> list[str]:
    """Run a statement with auto_explain reporting every nested plan as a NOTICE; return the plans."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.execute("SET auto_explain.log_level = 'notice'")
    conn.execute("SET client_min_messages = notice")
    conn.execute(statement, params).fetchall()
    conn.execute("SET auto_explain.log_min_duration = -1")
    return [n for n in notices if "Query Text" in n or "Plan" in n or "Scan" in n]


@pytest.mark.slow
def test_claim_uses_the_claimable_index_not_a_table_scan_on_a_large_backlog(conn: psycopg.Connection) -> None:
    fill_backlog(conn, BACKLOG)
    for _ in range(7):  # past the point where PL/pgSQL would switch to a cached generic plan
        conn.execute("SELECT count(*) FROM dlq_claim_events(1000, 60)").fetchone()
    plans = claimed_plans(conn, "SELECT id FROM dlq_claim_events(%s, 60)", (1000,))
    plan = next(p for p in reversed(plans) if "FOR UPDATE SKIP LOCKED" in p)
    populated = {r[0] for r in conn.execute("SELECT DISTINCT tableoid::regclass::text FROM dead_letter_events")}
    assert len(populated) >= 3
    pick, update = plan.split("InitPlan", 1)[1].split("->  Append", 1)
    # Picking the batch: an index scan of each partition merged in (priority, created_at) order: no sort, no
    # sequential scan, and every index used is a partition of the partial claimable index.
    assert "Merge Append" in pick and "Sort  " not in pick and "Seq Scan" not in pick, plan
    used = set(re.findall(r"Index Scan using (\S+) on", pick))
    parents = {
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT inhparent::regclass::text FROM pg_inherits WHERE inhrelid = ANY(%s::regclass[])",
            (list(used),),
        )
    }
    assert parents == {"ix_dead_letter_events_claimable"}, plan
    # Stamping the lease: the picked ids are found through the primary key of every populated partition.
    for partition in populated:
        assert f"Seq Scan on {partition} " not in update, plan
        assert f"Index Scan using {partition}_pkey on {partition} " in update, plan


def test_claim_orders_by_priority_then_age_and_leases(conn: psycopg.Connection) -> None:
    fill_backlog(conn, 50)
    expected = conn.execute(
        "SELECT id FROM dead_letter_events WHERE NOT resolved ORDER BY priority, created_at, id LIMIT 5"
    ).fetchall()
    rows = conn.execute(
        "SELECT id, priority, created_at, processing_lock, lock_expires_at - now() FROM dlq_claim_events(5, 900)"
    ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(e[0] for e in expected)
    assert len({r[3] for r in rows}) == 1  # one lease for the batch
    assert all(850 < r[4].total_seconds() <= 900 for r in rows)
    attempts = conn.execute(
        "SELECT processing_attempts FROM dead_letter_events WHERE id = %s", (rows[0][0],)
    ).fetchone()[0]
    assert attempts[-1]["lease"] == str(rows[0][3]) and attempts[-1]["attempt"] == 1


def test_live_leases_are_not_claimed_twice_but_expired_ones_are(conn: psycopg.Connection) -> None:
    fill_backlog(conn, 20)  # 18 unresolved
    first = conn.execute("SELECT id FROM dlq_claim_events(10, 600)").fetchall()
    second = conn.execute("SELECT id FROM dlq_claim_events(100, 600)").fetchall()
    assert len(first) == 10 and len(second) == 8
    assert not {r[0] for r in first} & {r[0] for r in second}
    assert conn.execute("SELECT id FROM dlq_claim_events(100, 600)").fetchall() == []
    conn.execute(
        "UPDATE dead_letter_events SET lock_expires_at = now() - interval '1 second' WHERE id = ANY(%s)",
        ([r[0] for r in first],),
    )
    again = conn.execute("SELECT id FROM dlq_claim_events(100, 600)").fetchall()
    assert sorted(again) == sorted(first)


def test_claim_filters_by_priority_ceiling_reason_and_due_time(conn: psycopg.Connection) -> None:
    fill_backlog(conn, 40)
    conn.execute("UPDATE dead_letter_events SET reason = 'validation_failed' WHERE priority = 2")
    conn.execute("UPDATE dead_letter_events SET next_attempt_at = now() + interval '1 hour' WHERE priority = 3")
    got = conn.execute("SELECT priority, reason FROM dlq_claim_events(100, 60, 3, NULL)").fetchall()
    assert {p for p, _ in got} == {1, 2}  # priority 3 is backing off
    got = conn.execute("SELECT DISTINCT reason FROM dlq_claim_events(100, 60, NULL, 'json_parse_error')").fetchall()
    assert got == [("json_parse_error",)]


@pytest.mark.parametrize("limit", [0, -1, 100_001])
def test_claim_rejects_a_nonsense_limit(conn: psycopg.Connection, limit: int) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT * FROM dlq_claim_events(%s)", (limit,))


def test_concurrent_claims_never_share_an_event(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as setup:
        fill_backlog(setup, 2000)
    with psycopg.connect(db_url) as a, psycopg.connect(db_url) as b:
        got_a = {r[0] for r in a.execute("SELECT id FROM dlq_claim_events(500)").fetchall()}
        got_b = {r[0] for r in b.execute("SELECT id FROM dlq_claim_events(500)").fetchall()}  # a not committed
        assert len(got_a) == 500 and len(got_b) == 500 and not got_a & got_b
        a.commit()
        b.commit()


def test_metadata_is_json(conn: psycopg.Connection) -> None:
    fill_backlog(conn, 3)
    (attempts,) = conn.execute("SELECT json_agg(processing_attempts) FROM dlq_claim_events(3)").fetchone()
    assert json.loads(json.dumps(attempts))
