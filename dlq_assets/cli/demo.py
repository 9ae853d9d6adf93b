"""Trying the DLQ out: ``dlq demo`` runs the whole path on a generated log, ``dlq dev`` serves the Dagster UI."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import psycopg

from dlq_assets.cli.app import main, url_of
from dlq_assets.cli.display import visible
from dlq_assets.cli.output import Finite, emit
from dlq_assets.cli.processing import process_summary
from dlq_assets.core import db
from dlq_assets.core.operations.inspect import dead_letters_by_reason, health_view
from dlq_assets.devtools.embedded import default_data_dir


@main.command()
@click.option("--events", default=2000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--seed", default=1, show_default=True)
@click.option("--corruption-rate", default=0.3, show_default=True, type=Finite(0, 1))
@click.option("--out", type=click.Path(path_type=Path), help="Where to write the log (default .dlq/demo).")
@click.option(
    "--dagster", "through_dagster", is_flag=True,
    help="Process through Dagster: materialize every asset and its checks on the instance `dlq dev` serves.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def demo(
    ctx: click.Context, events: int, seed: int, corruption_rate: float, out: Path | None, through_dagster: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Generate a corrupted Cowrie log, create the schema, ingest it, process it, and show the DLQ's health."""
    from dlq_assets.core.intake.ingest import ingest_paths
    from dlq_assets.core.migrations import migrate
    from dlq_assets.core.processing.config import WorkerConfig
    from dlq_assets.core.processing.pool import process as run_workers
    from dlq_assets.devtools.generator import write_corrupted_log

    out = out or default_data_dir().parent / "demo"
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"cowrie-seed{seed}.json"
    truth = write_corrupted_log(log, n_events=events, seed=seed, corruption_rate=corruption_rate,
                                truth_path=out / f"cowrie-seed{seed}.truth.jsonl")  # fmt: skip
    url = url_of(ctx)
    migrate(url)
    report = ingest_paths([log], url=url)
    if through_dagster:
        from dlq_assets.devtools.first_run import materialize_everything

        first = materialize_everything(url)
        processing: dict[str, Any] = {"dagster": asdict(first)}
    else:
        processing = {"process": run_workers(url, WorkerConfig(batch_size=1000)).as_dict() | {"batch_seconds": None}}
    with psycopg.connect(url) as conn:
        health_row = health_view(conn)
        reasons = dead_letters_by_reason(conn)
    data = {"log": str(log), "records_written": len(truth), "ingest": report.as_dict(), "dlq_by_reason": reasons,
            **processing, "health": health_row, "database": db.redact(url, url)}  # fmt: skip

    def human(d: dict[str, Any]) -> None:
        click.echo(f"wrote {d['records_written']} records to {visible(d['log'])}")
        click.echo(f"ingested: {report.raw_inserted} valid events -> raw_events, {report.dlq_inserted} -> DLQ "
                   f"({report.raw_duplicates + report.dlq_duplicates} already there)")  # fmt: skip
        click.echo("dead letters by reason:")
        for reason, count in reasons.items():
            click.echo(f"  {visible(reason):<20} {count}")
        if "process" in d:
            process_summary(d["process"])
        else:
            dagster_summary(d["dagster"])
        click.echo("health:")
        for key, value in health_row.items():
            click.echo(f"  {key:<28} {visible(value)}")

    emit(data, as_json, human)


def dagster_summary(first: dict[str, Any]) -> None:
    """What the first run through Dagster did: the processed batch's counts, its checks, where the UI finds them."""
    rounds = first["processing_rounds"]
    total = {
        key: sum(r.get(key, 0) for r in rounds)
        for key in ("processed", "repaired", "failed", "poisoned", "quarantined")
    }
    backlog = " -> ".join(str(r.get("backlog_pending")) for r in rounds)
    click.echo(
        f"processed through Dagster in {len(rounds)} runs: {total['processed']} dead letters: {total['repaired']} "
        f"resolved, {total['failed'] - total['poisoned']} to retry, {total['poisoned']} poisoned, "
        f"{total['quarantined']} quarantined; pending after each run: {backlog}"
    )
    failed = sorted(name for name, passed in first["checks"].items() if not passed)
    click.echo(
        f"checks: {len(first['checks']) - len(failed)} passed" + (f", failed: {', '.join(failed)}" if failed else "")
    )
    click.echo(f"materialized: {', '.join(first['metadata'])} (Dagster home {visible(first['dagster_home'])})")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=click.IntRange(1, 65535))
@click.pass_context
def dev(ctx: click.Context, host: str, port: int) -> None:
    """Run the Dagster webserver and daemon on the DLQ's PostgreSQL (embedded by default)."""
    from dlq_assets.devtools.dev import run

    announce = lambda address: click.echo(f"Dagster UI: {address}  (Ctrl-C stops it)", err=True)  # noqa: E731
    sys.exit(run(ctx.obj["url"], host=host, port=port, announce=announce))
