"""Working the backlog: ``dlq process`` runs the workers, ``dlq breaker`` reads or sets the breaker that guards them."""

from __future__ import annotations

import sys
from typing import Any

import click
import psycopg

from dlq_assets.cli.app import EXIT_BREAKER_OPEN, EXIT_UNHEALTHY, main, one_line, url_of
from dlq_assets.cli.display import visible
from dlq_assets.cli.output import MAX_ID, Finite, emit, polled_progress, print_fields
from dlq_assets.core.operations.control import BREAKER_ACTIONS, set_breaker
from dlq_assets.core.operations.inspect import BREAKER_COLUMNS, breaker_status
from dlq_assets.core.operations.progress import due_events, processed_since
from dlq_assets.core.processing.config import MAX_LEASE_SECONDS, MAX_RATE, MIN_RATE


@main.command()
@click.option("--priority", type=click.IntRange(1, 10), help="Only events of this priority or higher (1 is highest).")
@click.option("--limit", type=click.IntRange(1, MAX_ID), help="Stop after this many events.")
@click.option("--reason", help="Only dead letters with this reason.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Worker processes.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--lease-seconds", default=1800, show_default=True, type=click.IntRange(1, MAX_LEASE_SECONDS))
@click.option(
    "--lease-mode",
    type=click.Choice(["transaction", "committed"]),
    default="transaction",
    show_default=True,
    help="transaction: row locks are the lease (fast); committed: a visible lease row, written first.",
)
@click.option(
    "--time-budget", type=Finite(min=0, min_open=True, max=366 * 86_400), help="Stop claiming after this many seconds."
)
@click.option("--max-events-per-second", type=Finite(MIN_RATE, MAX_RATE), help="Rate limit.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def process(
    ctx: click.Context,
    priority: int | None,
    limit: int | None,
    reason: str | None,
    workers: int,
    batch_size: int,
    lease_seconds: int,
    lease_mode: str,
    time_budget: float | None,
    max_events_per_second: float | None,
    as_json: bool,
) -> None:
    """Repair, replay or retire the backlog: claim with a lease, verify, repair, write, complete."""
    from dlq_assets.core.processing.config import WorkerConfig
    from dlq_assets.core.processing.pool import process as run_workers

    config = WorkerConfig(
        batch_size=batch_size, min_batch_size=min(batch_size, 1000), max_batch_size=max(batch_size, 5000),
        lease_seconds=lease_seconds, lease_mode=lease_mode, priority_max=priority, reason=reason, limit=limit,
        time_budget_seconds=time_budget, max_events_per_second=max_events_per_second,
    )  # fmt: skip
    url = url_of(ctx)
    with psycopg.connect(url) as conn:
        due = due_events(conn, priority=priority, reason=reason)
    total = min(due, limit) if limit else due
    with polled_progress(url, "process", total, processed_since, hidden=as_json):
        report = run_workers(url, config, workers=workers)
    emit(report.as_dict() | {"batch_seconds": None}, as_json, process_summary)
    if report.infrastructure_error:
        error = report.infrastructure_error
        click.echo(
            "error: processing stopped by an infrastructure failure, no event was charged an attempt: "
            + visible(one_line(error, schema_missing="does not exist" in error)),
            err=True,
        )
        sys.exit(EXIT_UNHEALTHY)
    if report.breaker_denied:
        sys.exit(EXIT_BREAKER_OPEN)


def process_summary(d: dict[str, Any]) -> None:
    """A processing report (``ProcessReport.as_dict``) for a person: the counts, then the repairs by strategy."""
    click.echo(
        f"processed {d['processed']} dead letters in {d['batches']} batches ({d['events_per_second']} events/s): "
        f"{d['resolved']} resolved, {d['retried']} to retry, {d['poisoned']} poisoned, "
        f"{d['quarantined']} quarantined, {d['released']} handed back"
    )
    for method, count in sorted(d["strategies"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  {visible(method):<24} {count}")
    if d["breaker_denied"]:
        click.echo("the circuit breaker is open: nothing more was processed (dlq breaker status)")


@main.command()
@click.argument("action", type=click.Choice(["status", *BREAKER_ACTIONS]))
@click.option("--name", default="dlq_processing", show_default=True, help="Breaker name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def breaker(ctx: click.Context, action: str, name: str, as_json: bool) -> None:
    """Circuit breaker: status, or open / close / reset it by hand. Status only reads (dlq_reader may run it):
    a breaker no worker has checked yet has no row, and is reported as such rather than created."""
    with psycopg.connect(url_of(ctx), autocommit=True) as conn:
        if action != "status":
            set_breaker(conn, name, action)
        state = breaker_status(conn, name)
    if state is None:
        data = dict.fromkeys(BREAKER_COLUMNS) | {"breaker_name": name, "exists": False}
        emit(data, as_json, lambda d: click.echo(
            f"breaker {visible(name)} has no state yet: closed until a worker's first check creates it with the "
            "default threshold and timeout"
        ))  # fmt: skip
        return
    emit(state | {"exists": True}, as_json, print_fields)
