"""Moving events out of where they rest: ``dlq redrive`` sends poisoned events back, ``dlq cleanup`` retires old
resolved ones."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import click
import psycopg

from dlq_assets.cli.app import main, url_of
from dlq_assets.cli.display import visible
from dlq_assets.cli.output import MAX_ID, Finite, emit, polled_progress
from dlq_assets.core.operations.progress import expired_resolved


def _utc(moment: datetime | None) -> datetime | None:
    """A time given without a zone is UTC (the options say so)."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


@main.command()
@click.option("--id", "ids", multiple=True, type=click.IntRange(1, MAX_ID), help="A poisoned event id (repeatable).")
@click.option("--reason", help="Poisoned events with this reason.")
@click.option("--since", type=click.DateTime(), help="Poisoned at or after this time (UTC).")
@click.option("--until", type=click.DateTime(), help="Poisoned before this time (UTC).")
@click.option("--max-redrives", default=3, show_default=True, type=click.IntRange(0, 1000), help="Cycle protection.")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--max-per-second", type=Finite(0.001, 1e9), help="Pace the redrive.")
@click.option("--limit", type=click.IntRange(1, MAX_ID))
@click.option("--dry-run", is_flag=True, help="Show what would be redriven; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def redrive(
    ctx: click.Context,
    ids: tuple[int, ...],
    reason: str | None,
    since: datetime | None,
    until: datetime | None,
    max_redrives: int,
    batch_size: int,
    max_per_second: float | None,
    limit: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Move poisoned events back to processing (by id, reason or time range)."""
    from dlq_assets.core.operations.redrive import redrive as run_redrive

    report = run_redrive(
        url_of(ctx), ids=list(ids) or None, reason=reason, since=_utc(since), until=_utc(until),
        max_redrives=max_redrives, batch_size=batch_size, max_per_second=max_per_second, limit=limit,
        dry_run=dry_run,
    )  # fmt: skip
    verb = "would redrive" if dry_run else "redrove"
    emit(report.as_dict(), as_json, lambda d: click.echo(
        f"{verb} {d['redriven_count']} events; kept {d['kept_count']} (redriven {max_redrives} times already)"
    ))  # fmt: skip


@main.command()
@click.option("--older-than-days", default=90, show_default=True, type=click.IntRange(0, 36_500))
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--keep-partitions", is_flag=True, help="Delete rows only; never drop whole partitions.")
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def cleanup(
    ctx: click.Context, older_than_days: int, batch_size: int, keep_partitions: bool, dry_run: bool, as_json: bool
) -> None:
    """Retention: delete resolved events older than N days in batches, drop expired partitions."""
    from dlq_assets.core.operations.retention import run_retention

    url = url_of(ctx)
    with psycopg.connect(url) as conn:
        eligible = expired_resolved(conn, older_than_days, at=datetime.now(UTC))

    def done(conn: psycopg.Connection[Any], started: datetime) -> int:  # what has left the expired set since
        return eligible - expired_resolved(conn, older_than_days, at=started)

    with polled_progress(url, "cleanup", eligible, done, hidden=as_json or dry_run):
        report = run_retention(
            url, older_than_days=older_than_days, batch_size=batch_size, dry_run=dry_run,
            drop_partitions=not keep_partitions,
        )  # fmt: skip
    verb = "would delete" if dry_run else "deleted"
    emit(dataclasses.asdict(report), as_json, lambda d: click.echo(
        f"{verb} {d['rows_deleted']} resolved events older than {older_than_days} days in {d['batches']} batches; "
        f"partitions {'to drop' if dry_run else 'dropped'}: {visible(', '.join(d['partitions_dropped']) or 'none')}"
    ))  # fmt: skip
