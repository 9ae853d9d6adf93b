"""The ``dlq`` command line: the operator's tools on top of the plain-Python core."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import click
import psycopg
from rich import box
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from dlq_assets.cli.display import text, visible
from dlq_assets.core import db
from dlq_assets.core.migrations import MigrationError
from dlq_assets.devtools.embedded import EmbeddedServer, EmbeddedServerError, default_data_dir, resolve_url


def _json_default(value: object) -> str | float:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def _emit(data: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, default=_json_default, sort_keys=True))
    else:
        human(data)


def _table(data: dict[str, Any]) -> None:
    width = max(map(len, data), default=0)
    for key, value in data.items():
        click.echo(f"{key:<{width}}  {visible(value)}")


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {visible(message)}", err=True)
    sys.exit(code)


EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def _closed_pipe() -> NoReturn:
    """The reader left (``dlq analyze | head``): stop quietly like any filter. Output still buffered would fail
    again when the interpreter flushes at exit, so stdout is pointed at /dev/null first."""
    with suppress(OSError, ValueError):  # not a real file (a test runner's capture): no pipe to flush into
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(EXIT_CLOSED_PIPE)


class _Console(Console):
    """Rich's console, ending on a closed pipe like the rest of the command (Rich's own handler exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _closed_pipe()


class _Group(click.Group):
    """Turns expected failures into one clear line (``--debug`` shows the traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            finally:
                sys.stdout.flush()  # a reader gone shows here, where it is handled, not in the flush at exit
        except BrokenPipeError:
            _closed_pipe()
        except click.ClickException as exc:
            exc.message = visible(exc.message)  # it may quote a file name
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own control flow (--help, Ctrl-C); Exit is a RuntimeError
        except (psycopg.Error, MigrationError, EmbeddedServerError, RuntimeError, OSError, ValueError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _fail(db.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))


@click.group(cls=_Group)
@click.option("--database-url", envvar=db.URL_ENV, help="PostgreSQL URL, or 'embedded'; default: the embedded server.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, debug: bool) -> None:
    """Dead letter queue for event pipelines, on PostgreSQL."""
    ctx.obj = {"url": database_url, "debug": debug}


def _url(ctx: click.Context) -> str:
    return resolve_url(ctx.obj["url"])


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def create(ctx: click.Context, as_json: bool) -> None:
    """Create or upgrade the DLQ schema (apply pending migrations)."""
    from dlq_assets.core.migrations import current_version, migrate

    url = _url(ctx)
    applied = migrate(url)
    with psycopg.connect(url) as conn:
        version = current_version(conn)
    data = {"applied": [m.name for m in applied], "schema_version": version, "database": db.redact(url)}
    _emit(
        data,
        as_json,
        lambda d: click.echo(f"schema at version {version}; applied: {visible(', '.join(d['applied']) or 'nothing')}"),
    )


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 50_000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ingest(ctx: click.Context, paths: tuple[Path, ...], batch_size: int, as_json: bool) -> None:
    """Read Cowrie JSON logs, plain or compressed (gzip, bzip2, xz, zstd): valid events to raw_events, everything
    else to the DLQ. A damaged compressed file is reported on stderr; what it held before the damage is ingested
    and the rest becomes one dead letter, so the exit code stays 0."""
    from collections import Counter

    from dlq_assets.core.intake.ingest import expand_paths, ingest_paths

    files, _ = expand_paths(paths)
    total = sum(p.stat().st_size for p in files) or None  # bytes on disk: the bar counts compressed bytes read
    with click.progressbar(length=total or 0, label="ingest", file=sys.stderr, hidden=as_json or not total) as bar:
        report = ingest_paths(paths, url=_url(ctx), batch_size=batch_size, on_batch=bar.update)
    for d in report.damaged_files:
        what = "cut short" if d["reason"] == "compressed_truncated" else "corrupt"
        path, message = visible(d["path"]), visible(d["message"])
        click.echo(f"damaged: {path}: {d['compression']} data {what} ({message}); the first "
                   f"{d['decompressed_offset']} decompressed bytes were ingested, the {d['tail_bytes']} bytes from "
                   f"compressed offset {d['compressed_offset']} on are one {d['reason']} dead letter",
                   err=True)  # fmt: skip
    if skipped := Counter(s["reason"] for s in report.skipped_files):
        total_skipped = sum(skipped.values())
        click.echo(f"skipped {total_skipped} director{'y entry' if total_skipped == 1 else 'y entries'}: "
                   + "; ".join(f"{n} {visible(why)}" for why, n in sorted(skipped.items())) + " (listed in --json)",
                   err=True)  # fmt: skip

    def human(d: dict[str, Any]) -> None:
        _table(d | {"damaged_files": len(d["damaged_files"]), "skipped_files": len(d["skipped_files"])})

    _emit(report.as_dict(), as_json, human)


EXIT_UNHEALTHY = 5


def _health_data(conn: psycopg.Connection[Any], limits: Any) -> dict[str, Any]:
    from dlq_assets.core.operations.health import breaches, snapshot

    current = snapshot(conn, success_window_minutes=limits.success_window_minutes)
    return {**current.as_dict(), "breaches": breaches(current, limits)}


def _health_table(d: dict[str, Any]) -> None:
    table = Table("metric", "value", box=box.SIMPLE, show_header=False)
    for key, value in d.items():
        if key != "breaches":
            table.add_row(key, text("" if value is None else value))
    _Console().print(table)
    for name, why in d["breaches"].items():
        click.echo(f"BREACHED {name}: {visible(why)}")
    if not d["breaches"]:
        click.echo("healthy: no threshold breached")


@main.command()
@click.option("--max-high-retry", default=0, show_default=True, type=click.IntRange(0), help="retry_count > 5.")
@click.option("--max-stale-locks", default=0, show_default=True, type=click.IntRange(0))
@click.option("--max-backlog-age-hours", default=6.0, show_default=True, type=click.FloatRange(0))
@click.option("--max-tampered", default=0, show_default=True, type=click.IntRange(0))
@click.option("--max-malicious", default=0, show_default=True, type=click.IntRange(0))
@click.option("--min-success-rate", default=0.2, show_default=True, type=click.FloatRange(0, 1))
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
    from dlq_assets.core.operations.health import Thresholds

    limits = Thresholds(
        high_retry_events=max_high_retry, stale_locks=max_stale_locks, backlog_age_seconds=max_backlog_age_hours * 3600,
        tampered_events=max_tampered, malicious_events=max_malicious, min_success_rate=min_success_rate,
    )  # fmt: skip
    with psycopg.connect(_url(ctx)) as conn:
        data = _health_data(conn, limits)
    _emit(data, as_json, _health_table)
    if data["breaches"]:
        sys.exit(EXIT_UNHEALTHY)


@main.command()
@click.option("--duration", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Minutes to watch.")  # fmt: skip
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per refresh.")
@click.pass_context
def monitor(ctx: click.Context, duration: float, interval: float, as_json: bool) -> None:
    """Watch health, throughput and breakers live."""
    from dlq_assets.core.operations.health import Thresholds

    limits = Thresholds()
    deadline = time.monotonic() + duration * 60
    with psycopg.connect(_url(ctx), autocommit=True) as conn:
        if as_json:
            while True:
                click.echo(json.dumps(_monitor_data(conn, limits), default=_json_default, sort_keys=True))
                if time.monotonic() + interval > deadline:
                    return
                time.sleep(interval)
        # Redrawn here only, not by Rich's refresh thread: a closed pipe then ends the command, not that thread.
        view = _monitor_view(_monitor_data(conn, limits))
        with Live(view, console=_Console(), auto_refresh=False, transient=False) as live:
            while time.monotonic() + interval <= deadline:
                time.sleep(interval)
                live.update(_monitor_view(_monitor_data(conn, limits)), refresh=True)


def _monitor_data(conn: psycopg.Connection[Any], limits: Any) -> dict[str, Any]:
    data = _health_data(conn, limits)
    rate = conn.execute(
        "SELECT coalesce(sum(processed_count), 0), coalesce(sum(repaired_count), 0), "
        "coalesce(sum(processing_duration_ms), 0) FROM dlq_processing_metrics "
        "WHERE completed_at > now() - interval '1 minute'"
    ).fetchone()
    data["last_minute"] = {"processed": int(rate[0]), "resolved": int(rate[1]), "busy_ms": int(rate[2])}
    data["at"] = datetime.now(UTC)
    return data


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
@click.option("--since-hours", type=click.FloatRange(min=0, min_open=True), help="Only recent dead letters.")
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
    with psycopg.connect(_url(ctx)) as conn:
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
    _emit(
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
    columns = (
        "id, reason, source, source_inode, source_offset, priority, classification, retry_count, resolved, "
        "resolved_at, resolution_method, quarantined_at, next_attempt_at, processing_lock, lock_expires_at, "
        "created_at, idempotency_key, payload_checksum, "
        "dlq_payload_checksum(payload) = payload_checksum AS checksum_ok, "
        "payload::text AS payload, metadata_json, error_history, processing_attempts"
    )  # the payload as jsonb prints it: numbers exact (a float would round 100000000000000000000000.5)
    with psycopg.connect(_url(ctx)) as conn:
        cur = conn.execute(
            f"SELECT 'dead_letter' AS table_name, {columns} FROM dead_letter_events WHERE id = %s", (event_id,)
        )
        row = cur.fetchone()
        if row is None:
            cur = conn.execute(
                f"SELECT 'poison' AS table_name, {columns}, poisoned_at, poison_reason, redrive_count "
                "FROM dlq_poison_events WHERE id = %s",
                (event_id,),
            )
            row = cur.fetchone()
        if row is None:
            _fail(f"no dead letter or poisoned event with id {event_id}", 6)
        data = dict(zip([c.name for c in cur.description], row, strict=True))
    if as_json:  # the payload's own JSON text, spliced in: no number goes through a float
        payload = data.pop("payload")
        click.echo(json.dumps(data, default=_json_default, sort_keys=True)[:-1] + f', "payload": {payload}}}')
        return
    _inspect_view(data)


_PAYLOAD_SHOWN = 2000  # characters of a payload the human view prints


def _inspect_view(d: dict[str, Any]) -> None:
    console = _Console()
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
    with psycopg.connect(_url(ctx), autocommit=True) as conn:
        released = conn.execute("SELECT dlq_release_dead_batches()").fetchone()[0] if release_stale else 0
        cur = conn.execute(
            """
            SELECT processing_lock::text AS lease, 'committed' AS kind, count(*) AS events,
                   min(lock_expires_at) AS expires_at, bool_or(lock_expires_at <= now()) AS stale,
                   max(processing_attempts -> -1 ->> 'worker') AS worker
              FROM dead_letter_events WHERE processing_lock IS NOT NULL AND NOT resolved
             GROUP BY processing_lock
            UNION ALL
            SELECT lease::text, 'transaction', sum(cardinality(event_ids)), NULL, dlq_lease_holder(lease) IS NULL,
                   max(worker)
              FROM dlq_batch_leases GROUP BY lease
             ORDER BY expires_at NULLS LAST, lease
            """
        )
        leases = [dict(zip([c.name for c in cur.description], r, strict=True)) for r in cur.fetchall()]
    data = {"released": released, "leases": leases}

    def human(d: dict[str, Any]) -> None:
        table = Table("lease", "kind", "events", "expires_at", "stale", "worker", box=box.SIMPLE)
        for lease in d["leases"]:
            table.add_row(text(lease["lease"]), lease["kind"], str(lease["events"]), str(lease["expires_at"] or "-"),
                          "[red]yes[/red]" if lease["stale"] else "no", text(lease["worker"]))  # fmt: skip
        _Console().print(table if d["leases"] else "no leases held")
        if release_stale:
            click.echo(f"released {d['released']} events from stale leases")

    _emit(data, as_json, human)


@main.command()
@click.argument("action", type=click.Choice(["status", "open", "close", "reset"]))
@click.option("--name", default="dlq_processing", show_default=True, help="Breaker name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def breaker(ctx: click.Context, action: str, name: str, as_json: bool) -> None:
    """Circuit breaker: status, or open / close / reset it by hand. Status only reads (dlq_reader may run it):
    a breaker no worker has checked yet has no row, and is reported as such rather than created."""
    with psycopg.connect(_url(ctx), autocommit=True) as conn:
        if action != "status":
            conn.execute("SELECT dlq_breaker_set(%s, %s)", (name, action))
        cur = conn.execute(
            "SELECT breaker_name, state, failure_count, failure_threshold, timeout_seconds, last_failure_time, "
            "opened_at, next_attempt_time FROM dlq_circuit_breaker_state WHERE breaker_name = %s",
            (name,),
        )
        columns, row = [c.name for c in cur.description], cur.fetchone()
    if row is None:
        data = dict.fromkeys(columns) | {"breaker_name": name, "exists": False}
        _emit(data, as_json, lambda d: click.echo(
            f"breaker {visible(name)} has no state yet: closed until a worker's first check creates it with the "
            "default threshold and timeout"
        ))  # fmt: skip
        return
    _emit(dict(zip(columns, row, strict=True)) | {"exists": True}, as_json, _table)


@main.command()
@click.option("--priority", type=click.IntRange(1, 10), help="Only events of this priority or higher (1 is highest).")
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option("--reason", help="Only dead letters with this reason.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Worker processes.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--lease-seconds", default=1800, show_default=True, type=click.IntRange(1))
@click.option(
    "--lease-mode",
    type=click.Choice(["transaction", "committed"]),
    default="transaction",
    show_default=True,
    help="transaction: row locks are the lease (fast); committed: a visible lease row, written first.",
)
@click.option("--time-budget", type=click.FloatRange(min=0), help="Stop claiming after this many seconds.")
@click.option("--max-events-per-second", type=click.FloatRange(min=0, min_open=True), help="Rate limit.")
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
    from dlq_assets.core.processing.worker import WorkerConfig
    from dlq_assets.core.processing.worker import process as run_workers

    config = WorkerConfig(
        batch_size=batch_size, min_batch_size=min(batch_size, 1000), max_batch_size=max(batch_size, 5000),
        lease_seconds=lease_seconds, lease_mode=lease_mode, priority_max=priority, reason=reason, limit=limit,
        time_budget_seconds=time_budget, max_events_per_second=max_events_per_second,
    )  # fmt: skip
    url = _url(ctx)
    with psycopg.connect(url) as conn:
        (due,) = conn.execute(
            "SELECT count(*) FROM dead_letter_events WHERE NOT resolved AND quarantined_at IS NULL "
            "AND next_attempt_at <= now() AND (%(p)s::int IS NULL OR priority <= %(p)s) "
            "AND (%(r)s::text IS NULL OR reason = %(r)s)",
            {"p": priority, "r": reason},
        ).fetchone()
    total = min(due, limit) if limit else due
    done_sql = "SELECT coalesce(sum(batch_size), 0) FROM dlq_processing_metrics WHERE started_at >= %(started)s"
    with _polled_progress(url, "process", total, done_sql, {}, hidden=as_json):
        report = run_workers(url, config, workers=workers)
    _emit(report.as_dict() | {"batch_seconds": None}, as_json, _process_summary)
    if report.infrastructure_error:
        click.echo(
            f"error: processing stopped by an infrastructure failure, no event was charged an attempt: "
            f"{visible(report.infrastructure_error)}",
            err=True,
        )
        sys.exit(5)
    if report.breaker_denied:
        sys.exit(4)


def _process_summary(d: dict[str, Any]) -> None:
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
@click.option("--id", "ids", multiple=True, type=int, help="A poisoned event id (repeatable).")
@click.option("--reason", help="Poisoned events with this reason.")
@click.option("--since", type=click.DateTime(), help="Poisoned at or after this time (UTC).")
@click.option("--until", type=click.DateTime(), help="Poisoned before this time (UTC).")
@click.option("--max-redrives", default=3, show_default=True, type=click.IntRange(0), help="Cycle protection.")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--max-per-second", type=click.FloatRange(min=0, min_open=True), help="Pace the redrive.")
@click.option("--limit", type=click.IntRange(min=1))
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
        _url(ctx), ids=list(ids) or None, reason=reason, since=_utc(since), until=_utc(until),
        max_redrives=max_redrives, batch_size=batch_size, max_per_second=max_per_second, limit=limit,
        dry_run=dry_run,
    )  # fmt: skip
    verb = "would redrive" if dry_run else "redrove"
    _emit(report.as_dict(), as_json, lambda d: click.echo(
        f"{verb} {d['redriven_count']} events; kept {d['kept_count']} (redriven {max_redrives} times already)"
    ))  # fmt: skip


_EXPIRED = (
    "SELECT count(*) FROM dead_letter_events WHERE resolved AND quarantined_at IS NULL "
    "AND resolved_at < %(started)s - make_interval(days => %(days)s)"
)


@contextmanager
def _polled_progress(
    url: str, label: str, total: int, done_sql: str, params: dict[str, Any], *, hidden: bool
) -> Iterator[None]:
    """A progress bar on stderr fed by a thread that asks the database how much is done (``done_sql`` gets
    ``params`` and the start time as ``started``), so the work needs no hooks and several workers add up."""
    if hidden or total <= 0:
        yield
        return
    started = datetime.now(UTC)
    stop = threading.Event()
    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=_Console(stderr=True),
        transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(label, total=total)

        def poll() -> None:
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    while not stop.wait(0.5):
                        (done,) = conn.execute(done_sql, {**params, "started": started}).fetchone()
                        progress.update(task, completed=min(int(done), total))
            except psycopg.Error:  # the bar stops; the work's own connection reports what failed
                return

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


@main.command()
@click.option("--older-than-days", default=90, show_default=True, type=click.IntRange(0))
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

    url = _url(ctx)
    with psycopg.connect(url) as conn:
        (eligible,) = conn.execute(_EXPIRED, {"started": datetime.now(UTC), "days": older_than_days}).fetchone()
    done_sql = f"SELECT %(eligible)s - ({_EXPIRED})"
    params = {"eligible": eligible, "days": older_than_days}
    with _polled_progress(url, "cleanup", eligible, done_sql, params, hidden=as_json or dry_run):
        report = run_retention(
            url, older_than_days=older_than_days, batch_size=batch_size, dry_run=dry_run,
            drop_partitions=not keep_partitions,
        )  # fmt: skip
    verb = "would delete" if dry_run else "deleted"
    _emit(dataclasses.asdict(report), as_json, lambda d: click.echo(
        f"{verb} {d['rows_deleted']} resolved events older than {older_than_days} days in {d['batches']} batches; "
        f"partitions {'to drop' if dry_run else 'dropped'}: {visible(', '.join(d['partitions_dropped']) or 'none')}"
    ))  # fmt: skip


@main.command()
@click.option("--events", default=2000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--seed", default=1, show_default=True)
@click.option("--corruption-rate", default=0.3, show_default=True, type=click.FloatRange(0, 1))
@click.option("--out", type=click.Path(path_type=Path), help="Where to write the log (default .dlq/demo).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def demo(ctx: click.Context, events: int, seed: int, corruption_rate: float, out: Path | None, as_json: bool) -> None:
    """Generate a corrupted Cowrie log, create the schema, ingest it, and show the DLQ's health."""
    from dlq_assets.core.intake.ingest import ingest_paths
    from dlq_assets.core.migrations import migrate
    from dlq_assets.core.processing.worker import WorkerConfig
    from dlq_assets.core.processing.worker import process as run_workers
    from dlq_assets.devtools.generator import write_corrupted_log

    out = out or default_data_dir().parent / "demo"
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"cowrie-seed{seed}.json"
    truth = write_corrupted_log(log, n_events=events, seed=seed, corruption_rate=corruption_rate,
                                truth_path=out / f"cowrie-seed{seed}.truth.jsonl")  # fmt: skip
    url = _url(ctx)
    migrate(url)
    report = ingest_paths([log], url=url)
    processed = run_workers(url, WorkerConfig(batch_size=1000))
    with psycopg.connect(url) as conn:
        cur = conn.execute("SELECT * FROM dlq_health")
        health_row = dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))
        reasons = dict(conn.execute("SELECT reason, count(*) FROM dead_letter_events GROUP BY 1 ORDER BY 2 DESC"))
    data = {"log": str(log), "records_written": len(truth), "ingest": report.as_dict(), "dlq_by_reason": reasons,
            "process": processed.as_dict() | {"batch_seconds": None}, "health": health_row,
            "database": db.redact(url)}  # fmt: skip

    def human(d: dict[str, Any]) -> None:
        click.echo(f"wrote {d['records_written']} records to {visible(d['log'])}")
        click.echo(f"ingested: {report.raw_inserted} valid events -> raw_events, {report.dlq_inserted} -> DLQ "
                   f"({report.raw_duplicates + report.dlq_duplicates} already there)")  # fmt: skip
        click.echo("dead letters by reason:")
        for reason, count in reasons.items():
            click.echo(f"  {visible(reason):<20} {count}")
        _process_summary(d["process"])
        click.echo("health:")
        for key, value in health_row.items():
            click.echo(f"  {key:<28} {visible(value)}")

    _emit(data, as_json, human)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=click.IntRange(1, 65535))
@click.pass_context
def dev(ctx: click.Context, host: str, port: int) -> None:
    """Run the Dagster webserver and daemon on the DLQ's PostgreSQL (embedded by default)."""
    from dlq_assets.devtools.dev import run

    click.echo(f"Dagster UI: http://{host}:{port}  (Ctrl-C stops it)", err=True)
    sys.exit(run(ctx.obj["url"], host=host, port=port))


@main.group(name="db")
def db_group() -> None:
    """The embedded PostgreSQL server (used when no database URL is configured)."""


def _server() -> EmbeddedServer:
    return EmbeddedServer(default_data_dir())


def _status_dict(server: EmbeddedServer) -> dict[str, Any]:
    status = server.status()
    return {
        "data_dir": str(status.data_dir),
        "initialized": status.initialized,
        "running": status.running,
        "pid": status.pid,
        "url": status.url(db.EMBEDDED_DATABASE) if status.running else None,
        "stale_pid_file": status.stale_pid_file,
    }


@db_group.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Show whether the embedded server runs; exits 3 when it does not."""
    data = _status_dict(_server())
    _emit(data, as_json, _table)
    if not data["running"]:
        sys.exit(3)


@db_group.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def start(as_json: bool) -> None:
    """Start the embedded server (or join the running one) and create its database."""
    server = _server()
    db.ensure_database(server.start().url(), db.EMBEDDED_DATABASE)
    _emit(_status_dict(server), as_json, _table)


@db_group.command()
def stop() -> None:
    """Stop the embedded server cleanly."""
    click.echo("stopped" if _server().stop() else "not running")
