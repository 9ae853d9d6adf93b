"""The ``dlq`` command line: the operator's tools on top of the plain-Python core."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import click
import psycopg

from dlq_assets import db
from dlq_assets.embedded import EmbeddedServer, EmbeddedServerError, default_data_dir
from dlq_assets.migrations import MigrationError


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
        click.echo(f"{key:<{width}}  {value}")


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns expected failures into one clear line (``--debug`` shows the traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (psycopg.Error, MigrationError, EmbeddedServerError, RuntimeError, OSError, ValueError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _fail(db.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))


@click.group(cls=_Group)
@click.option("--database-url", envvar=db.URL_ENV, help="PostgreSQL URL; default: the embedded server.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, debug: bool) -> None:
    """Dead letter queue for event pipelines, on PostgreSQL."""
    ctx.obj = {"url": database_url, "debug": debug}


def _url(ctx: click.Context) -> str:
    return db.database_url(ctx.obj["url"])


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def create(ctx: click.Context, as_json: bool) -> None:
    """Create or upgrade the DLQ schema (apply pending migrations)."""
    from dlq_assets.migrations import current_version, migrate

    url = _url(ctx)
    applied = migrate(url)
    with psycopg.connect(url) as conn:
        version = current_version(conn)
    data = {"applied": [m.name for m in applied], "schema_version": version, "database": db.redact(url)}
    _emit(
        data,
        as_json,
        lambda d: click.echo(f"schema at version {version}; applied: {', '.join(d['applied']) or 'nothing'}"),
    )


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 50_000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ingest(ctx: click.Context, paths: tuple[Path, ...], batch_size: int, as_json: bool) -> None:
    """Read Cowrie JSON logs: valid events to raw_events, everything else to the DLQ."""
    from dlq_assets.ingest import ingest_paths

    total = sum(p.stat().st_size for p in paths if p.is_file()) or None
    with click.progressbar(length=total or 0, label="ingest", file=sys.stderr, hidden=as_json or not total) as bar:
        report = ingest_paths(paths, url=_url(ctx), batch_size=batch_size, on_batch=bar.update)
    _emit(report.as_dict(), as_json, _table)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def health(ctx: click.Context, as_json: bool) -> None:
    """Show the dlq_health view."""
    with psycopg.connect(_url(ctx)) as conn:
        cur = conn.execute("SELECT * FROM dlq_health")
        data = dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))
    _emit(data, as_json, _table)


@main.command()
@click.option("--events", default=2000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--seed", default=1, show_default=True)
@click.option("--corruption-rate", default=0.3, show_default=True, type=click.FloatRange(0, 1))
@click.option("--out", type=click.Path(path_type=Path), help="Where to write the log (default .dlq/demo).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def demo(ctx: click.Context, events: int, seed: int, corruption_rate: float, out: Path | None, as_json: bool) -> None:
    """Generate a corrupted Cowrie log, create the schema, ingest it, and show the DLQ's health."""
    from dlq_assets.generator import write_corrupted_log
    from dlq_assets.ingest import ingest_paths
    from dlq_assets.migrations import migrate

    out = out or default_data_dir().parent / "demo"
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"cowrie-seed{seed}.json"
    truth = write_corrupted_log(log, n_events=events, seed=seed, corruption_rate=corruption_rate,
                                truth_path=out / f"cowrie-seed{seed}.truth.jsonl")  # fmt: skip
    url = _url(ctx)
    migrate(url)
    report = ingest_paths([log], url=url)
    with psycopg.connect(url) as conn:
        cur = conn.execute("SELECT * FROM dlq_health")
        health_row = dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))
        reasons = dict(conn.execute("SELECT reason, count(*) FROM dead_letter_events GROUP BY 1 ORDER BY 2 DESC"))
    data = {"log": str(log), "records_written": len(truth), "ingest": report.as_dict(), "dlq_by_reason": reasons,
            "health": health_row, "database": db.redact(url)}  # fmt: skip

    def human(d: dict[str, Any]) -> None:
        click.echo(f"wrote {d['records_written']} records to {d['log']}")
        click.echo(f"ingested: {report.raw_inserted} valid events -> raw_events, {report.dlq_inserted} -> DLQ "
                   f"({report.raw_duplicates + report.dlq_duplicates} already there)")  # fmt: skip
        click.echo("dead letters by reason:")
        for reason, count in reasons.items():
            click.echo(f"  {reason:<20} {count}")
        click.echo("health:")
        for key, value in health_row.items():
            click.echo(f"  {key:<28} {value}")

    _emit(data, as_json, human)


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


if __name__ == "__main__":
    main()
