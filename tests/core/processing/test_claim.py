"""Claiming a batch: leases, ordering, and a plan that stays on the index as the backlog grows."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import psycopg
import pytest

from tests.conftest import at_once

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
def test_claim_reads_one_due_range_per_priority_not_a_table_scan_on_a_large_backlog(conn: psycopg.Connection) -> None:
    fill_backlog(conn, BACKLOG)
    conn.execute("UPDATE dead_letter_events SET next_attempt_at = now() + interval '1 hour' WHERE id % 3 = 0")
    conn.execute("ANALYZE dead_letter_events")
    for _ in range(7):  # past the point where PL/pgSQL would switch to a cached generic plan
        conn.execute("SELECT count(*) FROM dlq_claim_events(1000, 60)").fetchone()
    plans = claimed_plans(conn, "SELECT id FROM dlq_claim_events(%s, 60)", (1000,))
    plan = next(p for p in reversed(plans) if "FOR UPDATE SKIP LOCKED" in p)
    populated = {r[0] for r in conn.execute("SELECT DISTINCT tableoid::regclass::text FROM dead_letter_events")}
    assert len(populated) >= 3
    pick, update = plan.split("InitPlan", 1)[1].split("->  Append", 1)
    # Picking the batch: per priority, an index scan of each partition merged in due order: no sort, no
    # sequential scan, every index used a partition of the partial due index, and the due time a bound of the
    # range (an index condition, not a filter): the events waiting out a backoff are never read.
    assert "Merge Append" in pick and "Sort  " not in pick and "Seq Scan" not in pick, plan
    assert "generate_series" in pick, plan
    used = set(re.findall(r"Index Scan using (\S+) on", pick))
    parents = {
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT inhparent::regclass::text FROM pg_inherits WHERE inhrelid = ANY(%s::regclass[])",
            (list(used),),
        )
    }
    assert parents == {"ix_dead_letter_events_due"}, plan
    conditions = re.findall(r"Index Cond: (.*)", pick)
    assert conditions and all("next_attempt_at <= now()" in c and "priority = " in c for c in conditions), plan
    # Stamping the lease: the picked ids are found through the primary key of every populated partition.
    for partition in populated:
        assert f"Seq Scan on {partition} " not in update, plan
        assert f"Index Scan using {partition}_pkey on {partition} " in update, plan


@pytest.mark.parametrize("claim", ["events", "batch"])
def test_claim_orders_by_priority_then_due_time(conn: psycopg.Connection, claim: str) -> None:
    """Within a priority, the event that became due first goes first, whenever it was created: a retried event
    queues behind those due before it; one still waiting is not claimed at all."""
    fill_backlog(conn, 60)
    conn.execute(
        "UPDATE dead_letter_events SET next_attempt_at = now() - make_interval(secs => (id * 7919) % 60), "
        "retry_count = 1 WHERE id % 4 = 0"
    )
    conn.execute("UPDATE dead_letter_events SET next_attempt_at = now() + interval '1 minute' WHERE id % 5 = 0")
    due = conn.execute(
        "SELECT id FROM dead_letter_events WHERE NOT resolved AND next_attempt_at <= now() "
        "ORDER BY priority, next_attempt_at, id"
    ).fetchall()
    call = "dlq_claim_events({}, 60)" if claim == "events" else "dlq_claim_batch(gen_random_uuid(), {})"
    got = conn.execute(f"SELECT id FROM {call.format(20)}").fetchall()
    if claim == "batch":  # returned in claim order
        assert got == due[:20]
    else:  # returned by the UPDATE, in no order
        assert sorted(got) == sorted(due[:20])
    # Then all the others that are due (a transaction lease's second claim in one transaction sees its first),
    # and none still waiting.
    rest = conn.execute(f"SELECT id FROM {call.format(100)}").fetchall()
    assert {r[0] for r in got + rest} == {r[0] for r in due}
    assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE next_attempt_at > now()").fetchone()[0] > 0


def test_claim_leases_the_batch(conn: psycopg.Connection) -> None:
    fill_backlog(conn, 50)
    rows = conn.execute(
        "SELECT id, priority, created_at, processing_lock, lock_expires_at - clock_timestamp() "
        "FROM dlq_claim_events(5, 900)"
    ).fetchall()
    assert len(rows) == 5
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


def test_a_lease_taken_in_an_old_transaction_runs_from_when_it_is_taken(conn: psycopg.Connection) -> None:
    """now() is the transaction's start: a lease counted from it would be expired when taken, and anyone could
    claim its events at once."""
    fill_backlog(conn, 5)
    with conn.transaction():
        conn.execute("SELECT pg_sleep(1.2)")
        rows = conn.execute("SELECT processing_lock, lock_expires_at > clock_timestamp() FROM dlq_claim_events(2, 1)")
        (lease, live), *_ = rows.fetchall()
        assert live
        conn.execute("SELECT pg_sleep(1.2)")
        assert conn.execute("SELECT dlq_heartbeat(%s, 1)", (lease,)).fetchone() == (2,)
        still = (
            "SELECT bool_and(lock_expires_at > clock_timestamp()) FROM dead_letter_events WHERE processing_lock = %s"
        )
        assert conn.execute(still, (lease,)).fetchone() == (True,)


@pytest.mark.parametrize(
    "call",
    [
        "SELECT * FROM dlq_claim_events(5, 0)",
        "SELECT * FROM dlq_claim_events(5, 86401)",  # a dead holder's events would wait longer than a day
        "SELECT * FROM dlq_claim_events(5, 900, 0)",  # a priority ceiling no event has: claimed nothing, silently
        "SELECT * FROM dlq_claim_events(5, 900, 11)",
        "SELECT * FROM dlq_claim_batch(gen_random_uuid(), 5, -1)",
        "SELECT dlq_heartbeat(gen_random_uuid(), 100000)",
        "SELECT * FROM dlq_claim_fragment_chains(gen_random_uuid(), '{1}', 100, 0)",
        "SELECT * FROM process_dlq_events_enhanced(10, NULL, 0)",
    ],
)
def test_claims_refuse_leases_and_priorities_out_of_range(conn: psycopg.Connection, call: str) -> None:
    fill_backlog(conn, 5)
    with pytest.raises(psycopg.errors.InvalidParameterValue), conn.transaction():
        conn.execute(call)
    assert conn.execute("SELECT count(*) FROM dead_letter_events WHERE processing_lock IS NOT NULL").fetchone() == (0,)


def test_releasers_at_once_release_each_expired_lease_once(conn: psycopg.Connection, db_url: str) -> None:
    """Sessions releasing the same expired leases at once would deadlock (each taking them in its own order) or
    count again what one released; one releases while the others skip."""
    fill_backlog(conn, 200)
    conn.execute(
        "UPDATE dead_letter_events SET processing_lock = ('00000000-0000-4000-8000-' || lpad((id % 20)::text, 12, '0'))"
        "::uuid, lock_expires_at = now() - interval '1 minute' WHERE NOT resolved"
    )
    (expired,) = conn.execute("SELECT count(*) FROM dead_letter_events WHERE processing_lock IS NOT NULL").fetchone()

    def release() -> int:
        with psycopg.connect(db_url) as mine:
            (released,) = mine.execute("SELECT dlq_release_stale_leases()").fetchone()
            time.sleep(0.3)  # the transaction stays open: the others meet its row locks
            return released

    totals, errors = at_once(4, release)
    assert errors == [] and sum(totals) == expired
    charged = "SELECT count(*) FROM dead_letter_events WHERE retry_count = 1 AND processing_lock IS NULL"
    assert conn.execute(charged).fetchone() == (expired,)
