"""Processing scaled out as concurrent Dagster runs, against the set-based ceiling with as many connections.

    python -m benchmarks.runs --events 50000 --runs 1 2 4 --json

For each number of runs N: the throughput harness's backlog (benchmarks.throughput: its mix, its ground truth),
then N processes each execute the real processing job (``dlq_processing_job`` from the code location, its asset on
the ``database`` resource, one worker per run, on an ephemeral Dagster instance) at the same moment, as N processing
runs launched together do. Every event is verified against its ground truth; then the same backlog is reloaded and
the ceiling runs with N connections (alternating which goes first over repeats). The engine's time is the window
from the first run's step start to the last run's materialization: run start-up (imports, instance) is outside it,
as it is outside a long-running deployment's steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.throughput import (
    _clean,
    _require_empty,
    build_templates,
    create_side_tables,
    database,
    load_backlog,
    run_ceiling,
    verify,
)

# A run's time budget: long enough for the whole backlog, so each run stops when nothing is left to claim.
BUDGET_SECONDS = 3000  # the processing config's largest
STEP = "dlq_processed_batches"


def one_run(url: str, slot: int, runs: int, batch_size: int) -> dict[str, Any]:
    """One processing run in this process, started when the parent says go (a line on stdin); its step's window."""
    os.environ["DLQ_DATABASE_URL"] = url
    import dagster as dg

    from dlq_assets.definitions import defs
    from dlq_assets.defs.processing.jobs import processing_job, slot_tags

    job = defs.resolve_job_def(processing_job.name)
    instance = dg.DagsterInstance.ephemeral()
    config = {
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
        "ops": {"dlq_processed_batches": {"config": {"time_budget_seconds": BUDGET_SECONDS, "batch_size": batch_size}}},
    }
    print("ready", flush=True)
    sys.stdin.readline()
    # The backlog holds tampered events on purpose, so the blocking tampered_events check fails the run: the step's
    # own success is what counts here.
    result = job.execute_in_process(
        run_config=config, instance=instance, tags=slot_tags(slot, runs), raise_on_error=False
    )
    timestamps = {  # from the run's event log: when the step started, when its asset was materialized
        entry.dagster_event.event_type_value: entry.timestamp
        for entry in instance.all_logs(result.run_id)
        if entry.dagster_event is not None and entry.dagster_event.step_key == STEP
    }
    (materialized,) = result.get_asset_materialization_events()
    metadata = materialized.step_materialization_data.materialization.metadata
    return {
        "success": any(e.step_key == STEP for e in result.get_step_success_events()),
        "started": timestamps["STEP_START"],
        "ended": timestamps["ASSET_MATERIALIZATION"],
        "processed": metadata["processed"].value,
        "failed_checks": sorted(c.check_name for c in result.get_asset_check_evaluations() if not c.passed),
    }


def launch_runs(url: str, runs: int, batch_size: int) -> list[dict[str, Any]]:
    """``runs`` processing runs in as many processes, released together once every one has started up."""
    command = [sys.executable, "-m", "benchmarks.runs", "--one-run", "--database-url", url, "--batch-size",
               str(batch_size), "--runs", str(runs)]  # fmt: skip
    with ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(runs)]  # shown if a run fails

        def failed(what: str, log: Any) -> RuntimeError:
            log.seek(0)
            return RuntimeError(f"a processing run {what}:\n{log.read()[-4000:]}")

        procs = [
            subprocess.Popen([*command, "--slot", str(slot)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=log, text=True, cwd=Path(__file__).resolve().parents[1])
            for slot, log in zip(range(1, runs + 1), logs, strict=True)
        ]  # fmt: skip
        stack.callback(lambda: [proc.kill() for proc in procs if proc.poll() is None])
        for proc, log in zip(procs, logs, strict=True):
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise failed(f"did not start (exit {proc.wait()})", log)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = []
        for proc, log in zip(procs, logs, strict=True):
            out, _ = proc.communicate(timeout=BUDGET_SECONDS)
            if proc.returncode:
                raise failed(f"failed (exit {proc.returncode})", log)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports


def measure(url: str, *, events: int, runs_list: list[int], batch_size: int, repeat: int, seed: int) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        _require_empty(conn)
        try:
            create_side_tables(conn, build_templates(seed), events)
            rows = [_measure_runs(conn, url, runs, batch_size, repeat) for runs in runs_list]
            version = conn.execute("SHOW server_version").fetchone()[0]
        finally:
            _clean(conn)
    return {"events": events, "batch_size": batch_size, "repeat": repeat, "postgres": version,
            "cpus": os.cpu_count(), "results": rows,
            "all_states_correct": all(r["all_states_correct"] for r in rows)}  # fmt: skip


def _measure_runs(conn: psycopg.Connection[Any], url: str, runs: int, batch_size: int, repeat: int) -> dict[str, Any]:
    rates, ceilings, ratios, correct, worked, connections = [], [], [], True, [], []
    for n in range(repeat):
        ceiling_first = n % 2 == 1
        if ceiling_first:
            ceiling = _ceiling(conn, url, runs, batch_size)
        load_backlog(conn)
        with peak_backends(url) as peak:
            reports = launch_runs(url, runs, batch_size)
        connections.append(peak[0])
        checked = verify(conn)
        window = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
        if not ceiling_first:
            ceiling = _ceiling(conn, url, runs, batch_size)
        rate = checked["events"] / window
        rates.append(rate)
        ceilings.append(ceiling)
        ratios.append(rate / ceiling)
        correct = correct and checked["all_states_correct"] and all(r["success"] for r in reports)
        worked.append(sorted(r["processed"] for r in reports))
    return {
        "runs": runs,
        "events_per_s": round(statistics.median(rates), 1),
        "ceiling_events_per_s": round(statistics.median(ceilings), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "processed_per_run": worked,  # each repeat: the events each run claimed, sorted
        "peak_connections": max(connections),  # sessions on the DLQ database during the runs (sampler excluded)
        "all_states_correct": correct,
    }


@contextmanager
def peak_backends(url: str, interval: float = 0.02) -> Iterator[list[int]]:
    """The most sessions seen at once on the database while the block runs (sampled; this sampler not counted)."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not done.is_set():
                (count,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
                peak[0] = max(peak[0], count)
                time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def _ceiling(conn: psycopg.Connection[Any], url: str, runs: int, batch_size: int) -> float:
    load_backlog(conn)
    events = conn.execute("SELECT count(*) FROM dead_letter_events").fetchone()[0]
    _, seconds = run_ceiling(url, runs, batch_size)
    return events / seconds  # every event of the backlog, as the engine's rate counts them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runs", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 2, 4], help="numbers of concurrent runs to measure")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="alternated engine and ceiling measurements per N")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database-url", help="an empty DLQ database to use (default: a throwaway embedded cluster)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)  # a child: one processing run
    parser.add_argument("--slot", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_run:
        print(json.dumps(one_run(args.database_url, args.slot, args.runs[0], args.batch_size)), flush=True)
        return 0
    if args.events < 1 or args.repeat < 1 or min(args.runs) < 1:
        parser.error("--events, --runs and --repeat must be positive")
    started = time.perf_counter()
    with database(args.database_url) as url:
        result = measure(url, events=args.events, runs_list=args.runs, batch_size=args.batch_size,
                         repeat=args.repeat, seed=args.seed)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"PostgreSQL {result['postgres']}, {result['cpus']} CPUs, {result['events']:,} events, "
          f"one worker per run, medians of {result['repeat']}")  # fmt: skip
    for row in result["results"]:
        print(f"{row['runs']} runs: {row['events_per_s']:>10,.0f} events/s, "
              f"ceiling {row['ceiling_events_per_s']:,.0f} ({row['runs']} connections), ratio {row['ratio']} "
              f"{row['ratios']}; per run {row['processed_per_run']}; "
              f"{row['peak_connections']} connections at most")  # fmt: skip
    print("states: " + ("all correct" if result["all_states_correct"] else "WRONG STATES"))
    if args.json:
        print(json.dumps(result), flush=True)
    return 0 if result["all_states_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
