"""The database itself: ``dlq create`` applies the schema's migrations, ``dlq db ...`` runs the embedded server."""

from __future__ import annotations

import sys
from typing import Any

import click
import psycopg

from dlq_assets.cli.app import EXIT_NOT_RUNNING, main, url_of
from dlq_assets.cli.display import visible
from dlq_assets.cli.output import emit, print_fields
from dlq_assets.core import db
from dlq_assets.devtools.embedded import EmbeddedServer, default_data_dir


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def create(ctx: click.Context, as_json: bool) -> None:
    """Create or upgrade the DLQ schema (pending migrations, then changed function files)."""
    from dlq_assets.core.migrations import current_version, run_migrations

    url = url_of(ctx)
    run = run_migrations(url)
    with psycopg.connect(url) as conn:
        version = current_version(conn)
    data = {
        "applied": [m.name for m in run.migrations],
        "functions": [f.name for f in run.functions],
        "restored": run.restored,
        "schema_version": version,
        "database": db.redact(url, url),
    }

    def show(d: dict[str, Any]) -> None:
        click.echo(f"schema at version {version}; applied: {visible(', '.join(d['applied']) or 'nothing')}")
        if d["functions"]:
            click.echo(f"function files applied: {visible(', '.join(d['functions']))}")
        if d["restored"]:
            click.echo(f"missing, brought back: {visible(', '.join(d['restored']))}")

    emit(data, as_json, show)


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
    emit(data, as_json, print_fields)
    if not data["running"]:
        sys.exit(EXIT_NOT_RUNNING)


@db_group.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def start(as_json: bool) -> None:
    """Start the embedded server (or join the running one) and create its database."""
    server = _server()
    db.ensure_database(server.start().url(), db.EMBEDDED_DATABASE)
    emit(_status_dict(server), as_json, print_fields)


@db_group.command()
def stop() -> None:
    """Stop the embedded server cleanly."""
    click.echo("stopped" if _server().stop() else "not running")
