"""The throughput harness at a tiny size: every event checked against its ground truth, the report complete.

No timing is asserted here (the machine is shared and noisy): the numbers are for benchmarks/README.md.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from benchmarks.throughput import (
    MIX,
    RESOLVED_KINDS,
    VARIANTS,
    build_realistic_templates,
    build_templates,
    load_backlog,
    main,
    prepare,
    probed,
    run_engine,
    verify,
    verify_realistic,
)

KEYS = {
    "events_per_s",
    "ceiling_events_per_s",
    "ratio",
    "peak_rss_mb",
    "events",
    "all_states_correct",
    "p50_batch_ms",
    "p95_batch_ms",
    "workers",
    "batch_size",
}


def test_the_templates_follow_the_mix_and_are_stored_as_ingest_stores_them() -> None:
    templates = build_templates(seed=3)
    assert Counter(t.kind for t in templates) == {kind: share * VARIANTS for kind, share in MIX.items()}
    forms: dict[str, set[str]] = {}
    for t in templates:
        forms.setdefault(t.kind, set()).add(json.loads(t.metadata)["payload_form"])
    assert forms["trailing_comma"] == forms["missing_brace"] == forms["cut_value"] == {"raw_text"}
    assert forms["binary_junk"] == {"raw_base64"} and forms["transient"] == {"json"}
    assert {t.reason for t in templates if t.kind == "transient"} == {"target_unavailable"}
    assert {t.classification for t in templates if t.kind == "malicious"} == {"malicious"}
    assert all((t.expected is not None) == (t.kind in RESOLVED_KINDS) for t in templates)
    assert all((t.tampered is not None) == (t.kind == "tampered") for t in templates)


def last_json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_a_tiny_run_puts_every_event_where_it_belongs(
    db_url: str, conn: psycopg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--events", "2000", "--workers", "2", "--batch-size", "500", "--repeat", "2", "--database-url", db_url]
    code = main([*argv, "--json"])
    result = last_json_line(capsys.readouterr().out)
    assert code == 0
    assert result.keys() >= KEYS
    assert result["all_states_correct"] is True
    assert (result["events"], result["workers"], result["batch_size"], result["repeat"]) == (2000, 2, 500, 2)
    assert sum(total for _, total in result["states"].values()) == 2 * 2000  # every event of both runs
    assert all(correct == total for correct, total in result["states"].values())
    assert result["resolved"] == 1700 and result["quarantined"] == 80  # 85% and 4% of the mix, in each run
    assert result["ceiling_events_per_s"] > 0 and result["ratio"] > 0 and result["peak_rss_mb"] > 0
    # each engine run has a ceiling run of its own; the medians are theirs
    assert len(result["runs"]) == 2 and all(run["all_states_correct"] and run["ratio"] > 0 for run in result["runs"])
    ratios = sorted(run["ratio"] for run in result["runs"])
    assert result["ratio"] == round((ratios[0] + ratios[1]) / 2, 3)
    # The database is left as it was found: empty, without the harness's side tables.
    assert conn.execute("SELECT count(*) FROM dead_letter_events").fetchone() == (0,)
    assert conn.execute("SELECT to_regclass('bench_truth')").fetchone() == (None,)


def test_the_realistic_templates_are_the_dead_letters_of_a_damaged_log_with_their_truth() -> None:
    templates, log = build_realistic_templates(seed=3)
    assert log.dead_letters == len(templates) and 1500 < len(templates) < 2500 and log.groups_left_out == 0
    assert log.groups < len(templates) and log.largest_group >= 2  # adjacent dead letters are kept together
    assert {"pretty", "concatenated", "bom"} <= log.damaged_not_in_dlq.keys()  # the reader handles these at ingest
    assert all(t.kind != "clean" and t.expect in ("resolved", "unresolved", "untouched") for t in templates)
    # Resolved ones give back the generator's originals, at offsets within their bytes; the others give nothing.
    assert all(0 <= at < t.record_bytes for t in templates for at, _ in t.events)
    assert all(not t.events for t in templates if t.expect != "resolved")
    expect = {kind: {t.expect for t in templates if t.kind == kind} for kind in {t.kind for t in templates}}
    assert expect["trailing_comma"] == expect["python_literal"] == expect["bad_escape"] == {"resolved"}
    assert expect["binary_junk"] == expect["cut_at_field"] == expect["missing_field"] == {"unresolved"}
    assert expect["truncated"] == {"resolved", "unresolved"}  # only a record that lost just its "}" comes back


def test_a_tiny_realistic_run_puts_every_event_where_its_truth_says(
    db_url: str, conn: psycopg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two workers: adjacent dead letters claimed apart must each be attempted (only the later one waits).
    argv = ["--mix", "realistic", "--events", "2000", "--workers", "2", "--batch-size", "500", "--repeat", "1"]
    code = main([*argv, "--database-url", db_url, "--json"])
    result = last_json_line(capsys.readouterr().out)
    assert result["all_states_correct"] is True, (result["states"], result["strategies"])
    assert code == 0
    assert (result["mix"], result["events"]) == ("realistic", 2000)
    assert sum(total for _, total in result["states"].values()) == 2000
    assert all(correct == total for correct, total in result["states"].values())
    kinds = set(result["states"])
    assert len(kinds) >= 10, kinds
    assert {"trailing_comma", "truncated", "split_line", "python_literal", "binary_junk", "restart"} <= kinds
    assert 0 < result["resolved"] < 2000 and result["retried"] > 0  # both: what comes back and what cannot
    assert result["realistic"]["largest_group"] >= 2
    assert conn.execute("SELECT count(*) FROM dead_letter_events").fetchone() == (0,)
    assert conn.execute("SELECT to_regclass('bench_events')").fetchone() == (None,)


def test_the_realistic_verification_sees_an_event_gone_wrong(db_url: str) -> None:
    """No formality: a payload changed, a resolved event's row gone, an unrecoverable one resolved, a pending one
    charged twice, a resolved one's dead letter resolved by another method, a journal entry left all fail."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        prepare(conn, "realistic", 5, 600)
        load_backlog(conn)
        run_engine(db_url, 1, 500)
        checked = verify_realistic(conn)
        assert checked["all_states_correct"] is True, checked

        def wrong() -> int:
            return sum(total - correct for correct, total in verify_realistic(conn)["kinds"].values())

        conn.execute(
            "UPDATE raw_events SET payload = payload || '{\"x\": 1}' WHERE id = (SELECT min(id) FROM raw_events)"
        )
        assert wrong() == 1
        conn.execute("DELETE FROM raw_events WHERE id = (SELECT max(id) FROM raw_events)")
        assert wrong() == 2 and verify_realistic(conn)["all_states_correct"] is False
        conn.execute(
            "UPDATE dead_letter_events SET resolved = true, resolved_at = now(), resolution_method = 'x' "
            "WHERE id = (SELECT min(id) FROM dead_letter_events WHERE NOT resolved)"
        )
        assert wrong() == 3
        conn.execute(  # a pending one charged twice
            "UPDATE dead_letter_events SET retry_count = 2, error_history = error_history || error_history "
            "WHERE id = (SELECT max(id) FROM dead_letter_events WHERE NOT resolved AND retry_count = 1)"
        )
        assert wrong() == 4
        conn.execute(  # a resolved one's row linked to a dead letter resolved another way
            "UPDATE dead_letter_events SET resolution_method = 'replay' WHERE id = (SELECT max(dlq_event_id) "
            "FROM raw_events WHERE repair_strategy <> 'replay')"
        )
        assert wrong() == 5
        conn.execute("INSERT INTO dlq_batch_leases (lease, event_ids) VALUES (gen_random_uuid(), '{1}')")
        assert verify_realistic(conn)["all_states_correct"] is False and wrong() == 5  # a journal entry left


def test_the_verification_sees_a_target_row_or_a_resolution_gone_wrong(db_url: str) -> None:
    """Beyond the payload: the columns raw_events derives from it, its partial flag, its strategy and dead letter,
    and the dead letter's resolution method are each checked."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        prepare(conn, "standard", 5, 600)
        load_backlog(conn)
        run_engine(db_url, 1, 500)
        assert verify(conn)["all_states_correct"] is True

        def wrong() -> int:
            return sum(total - correct for correct, total in verify(conn)["kinds"].values())

        one, whole = (
            "(SELECT min(id) FROM raw_events WHERE partial)",
            "(SELECT min(id) FROM raw_events WHERE NOT partial)",
        )
        pending = (  # a pending event still right
            "(SELECT min(id) FROM dead_letter_events WHERE NOT resolved AND retry_count = 1 AND error_history <> '[]' "
            "AND next_attempt_at < now() + interval '1 day')"
        )
        for n, change in enumerate(
            (
                f"UPDATE raw_events SET partial = false WHERE id = {one}",
                "UPDATE raw_events SET eventid = 'cowrie.bogus' WHERE id = (SELECT max(id) FROM raw_events)",
                f"UPDATE raw_events SET src_ip = '0.0.0.0' WHERE id = {whole}",
                "UPDATE raw_events SET dlq_event_id = NULL WHERE id = (SELECT max(id) FROM raw_events WHERE partial)",
                "UPDATE dead_letter_events SET resolution_method = 'bogus' WHERE id = (SELECT max(dlq_event_id) "
                "FROM raw_events WHERE NOT partial AND eventid <> 'cowrie.bogus')",
                f"UPDATE dead_letter_events SET retry_count = 2, error_history = error_history || error_history "
                f"WHERE id = {pending}",  # charged twice
                f"UPDATE dead_letter_events SET error_history = '[]' WHERE id = {pending}",  # its attempt forgotten
                f"UPDATE dead_letter_events SET next_attempt_at = now() + interval '100 years' WHERE id = {pending}",
                "UPDATE dead_letter_events SET resolved_at = NULL WHERE id = (SELECT min(id) FROM dead_letter_events "
                "WHERE resolved AND resolved_at IS NOT NULL)",
            ),
            start=1,
        ):
            conn.execute(change)
            assert wrong() == n, change
        assert verify(conn)["all_states_correct"] is False
        # a journal entry left behind (its events would be charged at the next claim) fails the run as a whole
        conn.execute(
            "INSERT INTO dlq_batch_leases (lease, event_ids) "
            "SELECT gen_random_uuid(), array_agg(id) FROM dead_letter_events WHERE NOT resolved"
        )
        checked = verify(conn)
        assert wrong() == 9 and checked["all_states_correct"] is False


def test_health_mode_reports_its_numbers(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--health", "--events", "1000", "--database-url", db_url, "--json"]) == 0
    result = last_json_line(capsys.readouterr().out)
    assert {"health_ms_pending", "health_ms_resolved", "retention_rows_per_s"} <= result.keys()
    assert (result["retention_rows"], result["rows_left"]) == (1000, 0)
    # a live event was ingested and resolved beside retention, and alone before it, every one of them resolved
    assert result["probes_all_resolved"] is True
    assert result["probe_alone"]["probes"] > 0 and result["probe_beside_retention"]["probes"] > 0
    assert result["probe_beside_retention"]["lock_samples"] > 0
    assert 0 < result["retention_longest_batch_ms"] <= result["retention_seconds"] * 1000


@pytest.mark.parametrize("argument", ["--batch-size=0", "--batch-size=100001", "--retention-batch-size=0"])
def test_a_batch_size_no_worker_takes_is_a_usage_error(argument: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([argument])
    assert exited.value.code == 2 and "must be between 1 and 100000" in capsys.readouterr().err


def test_a_database_that_holds_dead_letters_is_refused(db_url: str, conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO dead_letter_events (reason, payload) VALUES ('x', '{}')")
    with pytest.raises(SystemExit, match="empty"):
        main(["--events", "10", "--database-url", db_url])


def test_the_probe_sees_a_session_waiting_on_a_lock(db_url: str) -> None:
    """The lock sampler is no formality: a session held up by another's lock for 0.3 s shows in it."""

    def contended() -> None:
        with psycopg.connect(db_url, autocommit=True) as holder, psycopg.connect(db_url, autocommit=True) as waiter:
            holder.execute("SELECT pg_advisory_lock(6)")
            thread = threading.Thread(target=lambda: waiter.execute("SELECT pg_advisory_lock(6)"))
            thread.start()
            time.sleep(0.3)
            holder.execute("SELECT pg_advisory_unlock(6)")
            thread.join()

    offsets = itertools.count()
    _, calm = probed(db_url, lambda: time.sleep(0.2), offsets)
    _, seen = probed(db_url, contended, offsets)
    assert calm.samples > 0 and calm.samples_with_lock_wait == 0 and calm.longest_lock_wait == 0
    assert seen.samples_with_lock_wait > 0 and 0.1 < seen.longest_lock_wait < 5
    assert seen.longest_wait.startswith("SELECT pg_advisory_lock(6) waited for ExclusiveLock on advisory, behind ")
    assert calm.latencies and seen.latencies  # and the probe's own events went through


def test_concurrent_processing_runs_put_every_event_where_it_belongs(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import runs

    code = runs.main(["--events", "1500", "--runs", "1", "2", "--repeat", "1", "--database-url", db_url, "--json"])
    result = last_json_line(capsys.readouterr().out)
    assert code == 0 and result["all_states_correct"] is True
    assert [row["runs"] for row in result["results"]] == [1, 2]
    for row in result["results"]:
        assert row.keys() >= {"events_per_s", "ceiling_events_per_s", "ratio", "peak_connections"}
        assert row["events_per_s"] > 0 and row["ceiling_events_per_s"] > 0
        (per_run,) = row["processed_per_run"]
        assert len(per_run) == row["runs"]
        assert row["peak_connections"] >= row["runs"]  # each run held at least its worker's connection


def test_the_ingest_harness_finds_every_record_in_one_place_byte_exact(
    db_url: str, conn: psycopg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import ingest

    code = ingest.main(["--records", "1200", "--damage", "0.3", "--repeat", "2", "--database-url", db_url, "--json"])
    result = last_json_line(capsys.readouterr().out)
    assert code == 0 and result["all_records_correct"] is True, result["wrong"]
    assert result.keys() >= {"records_per_s", "mb_per_s", "ceiling_records_per_s", "ratio", "peak_rss_mb", "records"}
    assert result["records"] > 1100 and result["raw_inserted"] + result["dlq_inserted"] == result["records"]
    assert result["dlq_inserted"] > 0 and len(result["ratios"]) == 2
    assert conn.execute("SELECT count(*) FROM raw_events").fetchone() == (0,)  # left empty


def test_the_ingest_harness_sees_a_record_stored_wrong(db_url: str, tmp_path: Path) -> None:
    """The verification is no formality: a dead letter whose text was changed, or a record stored twice, fails."""
    from benchmarks import ingest
    from dlq_assets.core.intake.ingest import ingest_paths

    paths = ingest.write_logs(tmp_path, 400, 0.3, seed=5)
    ingest_paths(paths, url=db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert ingest.verify(conn, paths)["all_records_correct"] is True
        conn.execute(
            "UPDATE dead_letter_events SET payload = jsonb_build_object('raw_text', payload ->> 'raw_text' || ' ') "
            "WHERE id = (SELECT min(id) FROM dead_letter_events WHERE payload ? 'raw_text')"
        )
        checked = ingest.verify(conn, paths)
        assert checked["wrong"] == 1 and "raw_text differs" in checked["examples"][0]
        conn.execute(  # the position of an event written to raw_events, also as a dead letter
            "INSERT INTO dead_letter_events (source, source_inode, source_offset, reason, payload) "
            "SELECT source, source_inode, source_offset, 'json_parse_error', '{\"raw_text\": \"x\"}' "
            "FROM raw_events WHERE id = (SELECT min(id) FROM raw_events)"
        )
        checked = ingest.verify(conn, paths)
        assert checked["wrong"] == 2 and any("in 2 places" in e for e in checked["examples"]), checked


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE raw_events SET event_timestamp = event_timestamp + interval '1 hour' WHERE id = {raw}",
        "UPDATE raw_events SET session = 'ffffffffffff' WHERE id = {raw}",
        "UPDATE raw_events SET eventid = 'cowrie.bogus' WHERE id = {raw}",
        "UPDATE raw_events SET src_ip = '192.0.2.1' WHERE id = {raw}",
        "UPDATE raw_events SET partial = true WHERE id = {raw}",
        "UPDATE raw_events SET source_inode = source_inode || '.2' WHERE id = {raw}",
        "UPDATE dead_letter_events SET reason = 'truncated' WHERE id = {dead}",
        "UPDATE dead_letter_events SET priority = 1 WHERE id = {dead}",
        "UPDATE dead_letter_events SET classification = 'benign' WHERE id = {dead}",
        "UPDATE dead_letter_events SET resolved = true, resolved_at = now(), resolution_method = 'superseded' "
        "WHERE id = {dead}",
        "UPDATE dead_letter_events SET metadata_json = metadata_json || '{{\"record_bytes\": 1}}' WHERE id = {dead}",
    ],
)
def test_the_ingest_harness_sees_a_row_written_wrong(db_url: str, tmp_path: Path, change: str) -> None:
    """Beyond the bytes: the columns an event's row derives from its payload, its provenance and key, and a dead
    letter's reason, priority, classification, length and pending state are each checked."""
    from benchmarks import ingest
    from dlq_assets.core.intake.ingest import ingest_paths

    paths = ingest.write_logs(tmp_path, 400, 0.3, seed=5)
    ingest_paths(paths, url=db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        raw = "(SELECT max(id) FROM raw_events WHERE session IS NOT NULL AND src_ip IS NOT NULL)"
        dead = "(SELECT min(id) FROM dead_letter_events WHERE reason = 'json_parse_error' AND priority > 1)"
        conn.execute(change.format(raw=raw, dead=dead))
        checked = ingest.verify(conn, paths)
        assert checked["wrong"] == 1, checked
