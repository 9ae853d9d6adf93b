"""Looking at the DLQ without changing it (bar ``locks --release-stale``): ``health``, ``monitor``, ``analyze``,
``inspect`` and ``locks``."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import psycopg
from rich import box
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dlq_assets.cli.app import EXIT_NOT_FOUND, EXIT_UNHEALTHY, fail, main, url_of
from dlq_assets.cli.display import text, visible
from dlq_assets.cli.output import Console, Finite, emit, json_default
from dlq_assets.core.operations.control import release_stale_leases
from dlq_assets.core.operations.health import Thresholds, breaches, snapshot
from dlq_assets.core.operations.inspect import find_event, list_leases, throughput


def _health_data(conn: psycopg.Connection[Any], limits: Thresholds) -> dict[str, Any]:
    current = snapshot(conn, success_window_minutes=limits.success_window_minutes)
    return {**current.as_dict(), "breaches": breaches(current, limits)}


def _health_table(d: dict[str, Any]) -> None:
    table = Table("metric", "value", box=box.SIMPLE, show_header=False)
    for key, value in d.items():
        if key != "breaches":
            table.add_row(key, text("" if value is None else value))
    Console().print(table)
    for name, why in d["breaches"].items():
        click.echo(f"BREACHED {name}: {visible(why)}")
    if not d["breaches"]:
        click.echo("healthy: no threshold breached")


@main.command()
@click.option("--max-high-retry", default=0, show_default=True, type=click.IntRange(0), help="retry_count > 5.")
@click.option("--max-stale-locks", default=0, show_default=True, type=click.IntRange(0))
@click.option("--max-backlog-age-hours", default=6.0, show_default=True, type=Finite(0, 24 * 365))
@click.option("--max-tampered", default=0, show_default=True, type=click.IntRange(0))
@click.option("--max-malicious", default=0, show_default=True, type=click.IntRange(0))
@click.option("--min-success-rate", default=0.2, show_default=True, type=Finite(0, 1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def health(
    ctx: click.Context,
    max_high_retry: int,
    max_stale_locks: int,
    max_backlog_age_hours: float,
    max_tampered: int,
    max_malicious: int,
    min_success_rate: float,
    as_json: bool,
) -> None:
    """The DLQ's health; exits 5 when a threshold is breached (for cron and scripts)."""
    limits = Thresholds(
        high_retry_events=max_high_retry, stale_locks=max_stale_locks, backlog_age_seconds=max_backlog_age_hours * 3600,
        tampered_events=max_tampered, malicious_events=max_malicious, min_success_rate=min_success_rate,
    )  # fmt: skip
    with psycopg.connect(url_of(ctx)) as conn:
        data = _health_data(conn, limits)
    emit(data, as_json, _health_table)
    if data["breaches"]:
        sys.exit(EXIT_UNHEALTHY)


@main.command()
@click.option("--duration", default=10.0, show_default=True, type=Finite(min=0, min_open=True, max=60 * 24 * 365),
              help="Minutes to watch.")  # fmt: skip
@click.option("--interval", default=2.0, show_default=True, type=Finite(min=0.1, max=3600), help="Seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per refresh.")
@click.pass_context
def monitor(ctx: click.Context, duration: float, interval: float, as_json: bool) -> None:
    """Watch health, throughput and breakers live."""
    limits = Thresholds()
    deadline = time.monotonic() + duration * 60
    with psycopg.connect(url_of(ctx), autocommit=True) as conn:
        if as_json:
            while True:
                click.echo(json.dumps(_monitor_data(conn, limits), default=json_default, sort_keys=True))
                if time.monotonic() + interval > deadline:
                    return
                time.sleep(interval)
        # Redrawn here only, not by Rich's refresh thread: a closed pipe then ends the command, not that thread.
        view = _monitor_view(_monitor_data(conn, limits))
        with Live(view, console=Console(), auto_refresh=False, transient=False) as live:
            while time.monotonic() + interval <= deadline:
                time.sleep(interval)
                live.update(_monitor_view(_monitor_data(conn, limits)), refresh=True)


def _monitor_data(conn: psycopg.Connection[Any], limits: Thresholds) -> dict[str, Any]:
    return _health_data(conn, limits) | {"last_minute": throughput(conn, minutes=1), "at": datetime.now(UTC)}


def _monitor_view(d: dict[str, Any]) -> Table:
    table = Table(title=f"dlq monitor  {d['at']:%H:%M:%S} UTC", box=box.ROUNDED)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("pending_events", "processed_events", "quarantined_events", "poisoned_events", "locked_events",
                "stale_locks", "high_retry_events", "backlog_age_seconds", "recent_success_rate"):  # fmt: skip
        value = d.get(key)
        table.add_row(key, "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value))
    minute = d["last_minute"]
    table.add_row("processed / min", str(minute["processed"]))
    table.add_row("resolved / min", str(minute["resolved"]))
    table.add_row("open breakers", text(", ".join(f"{k}={v}" for k, v in d["open_breakers"].items()) or "none"))
    for name, why in d["breaches"].items():
        table.add_row(Text(name, style="red"), text(why, style="red"))
    return table


@main.command()
@click.option("--since-hours", type=Finite(min=0, min_open=True, max=24 * 365 * 100), help="Only recent dead letters.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1, 100))
@click.option("--chart", "chart_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG chart.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def analyze(ctx: click.Context, since_hours: float | None, top: int, chart_path: Path | None, as_json: bool) -> None:
    """Failure patterns: by reason, source, error class, repair strategy and hour."""
    from datetime import timedelta

    from dlq_assets.core.operations.analysis import analyze as run_analysis
    from dlq_assets.core.operations.analysis import chart_png

    since = datetime.now(UTC) - timedelta(hours=since_hours) if since_hours else None
    with psycopg.connect(url_of(ctx)) as conn:
        patterns = run_analysis(conn, since=since, top=top)
    if chart_path:
        chart_path.write_bytes(chart_png(patterns))
    data = {
        "summary": patterns.summary(),
        "top_patterns": patterns.top_patterns.head(top).to_dict(orient="records"),
        "by_reason": patterns.by_reason.to_dict(orient="records"),
        "by_error_class": patterns.by_error_class.head(top).to_dict(orient="records"),
        "by_strategy": patterns.by_strategy.to_dict(orient="records"),
        "chart": str(chart_path) if chart_path else None,
    }
    emit(
        data,
        as_json,
        lambda d: click.echo(
            "\n".join(map(visible, patterns.as_markdown(limit=top).split("\n")))
            + (f"\nchart: {visible(chart_path)}" if chart_path else "")
        ),
    )


@main.command()
@click.argument("event_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def inspect(ctx: click.Context, event_id: int, as_json: bool) -> None:
    """One dead letter (or poisoned event): payload, checksum status, error and attempt history."""
    with psycopg.connect(url_of(ctx)) as conn:
        data = find_event(conn, event_id)
    if data is None:
        fail(f"no dead letter or poisoned event with id {event_id}", EXIT_NOT_FOUND)
    if as_json:  # the payload's own JSON text, spliced in: no number goes through a float
        payload = data.pop("payload")
        click.echo(json.dumps(data, default=json_default, sort_keys=True)[:-1] + f', "payload": {payload}}}')
        return
    _inspect_view(data)


_PAYLOAD_SHOWN = 2000  # characters of a payload the human view prints


def _inspect_view(d: dict[str, Any]) -> None:
    console = Console()
    if d["table_name"] == "poison":
        state = "poisoned"
    elif d["resolved"]:
        state = "resolved"
    else:
        state = "quarantined" if d["quarantined_at"] else "leased" if d["processing_lock"] else "pending"
    head = Table(box=box.SIMPLE, show_header=False)
    for key in ("id", "reason", "source", "source_offset", "priority", "classification", "retry_count",
                "resolution_method", "next_attempt_at", "created_at", "idempotency_key"):  # fmt: skip
        head.add_row(key, text(d[key]))
    head.add_row("state", state)
    head.add_row("checksum", "[green]ok[/green]" if d["checksum_ok"] else "[red]MISMATCH: tampered[/red]")
    console.print(head)
    payload = d["payload"]
    more = f" ... ({len(payload) - _PAYLOAD_SHOWN:,} more characters: --json has them all)"
    click.echo(f"payload: {visible(payload[:_PAYLOAD_SHOWN])}{more if len(payload) > _PAYLOAD_SHOWN else ''}")
    for title, history in (("errors", d["error_history"]), ("attempts", d["processing_attempts"])):
        # The processor role writes processing_attempts: an entry need not be an object.
        entries = [e if isinstance(e, dict) else {"value": e} for e in history]
        if not entries:
            click.echo(f"{title}: none")
            continue
        table = Table(title=title, box=box.SIMPLE)
        keys = sorted({k for e in entries for k in e})
        for key in keys:
            table.add_column(text(key))
        for entry in entries:
            table.add_row(*(text(entry.get(k, "")) for k in keys))
        console.print(table)


@main.command()
@click.option(
    "--release-stale", is_flag=True, help="Release expired leases and dead batches (each event: a failed attempt)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def locks(ctx: click.Context, release_stale: bool, as_json: bool) -> None:
    """Leases held now: by lease, with their events, expiry and whether they are stale. A transaction lease has
    no expiry: it is stale when the session that held it is gone."""
    with psycopg.connect(url_of(ctx), autocommit=True) as conn:
        released = release_stale_leases(conn) if release_stale else 0
        data = {"released": released, "leases": list_leases(conn)}

    def human(d: dict[str, Any]) -> None:
        table = Table("lease", "kind", "events", "expires_at", "stale", "worker", box=box.SIMPLE)
        for lease in d["leases"]:
            table.add_row(text(lease["lease"]), lease["kind"], str(lease["events"]), str(lease["expires_at"] or "-"),
                          "[red]yes[/red]" if lease["stale"] else "no", text(lease["worker"]))  # fmt: skip
        Console().print(table if d["leases"] else "no leases held")
        if release_stale:
            click.echo(f"released {d['released']} events from stale leases")

    emit(data, as_json, human)
