"""The ``dlq`` click group: global options, the database URL, exit codes and how failures end a command.

The command modules register their commands on ``main``; ``dlq_assets.cli`` imports them all, so importing the
package gives the complete command.
"""

from __future__ import annotations

import os
import sys
from contextlib import suppress
from typing import Any, NoReturn

import click
import psycopg

from dlq_assets.cli.display import visible
from dlq_assets.core import db
from dlq_assets.core.migrations import MigrationError
from dlq_assets.devtools.embedded import EmbeddedServerError, resolve_url

MAX_ERROR_CHARS = 600  # an error line longer than this is cut

# Exit codes (README, "The dlq command"). 2 is click's own, for a usage error.
EXIT_ERROR = 1
EXIT_NOT_RUNNING = 3  # db status: the embedded server is not running
EXIT_BREAKER_OPEN = 4  # process: the circuit breaker denied the work
EXIT_UNHEALTHY = 5  # health: a threshold breached; process: an infrastructure failure stopped it
EXIT_NOT_FOUND = 6  # inspect: no such event
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def one_line(message: str, *, schema_missing: bool = False) -> str:
    """An error as one line: its first, cut at MAX_ERROR_CHARS (a statement quoted whole comes after what
    failed), with the way out when the schema is missing or out of date."""
    lines = message.strip().splitlines() or [""]
    line = lines[0] if len(lines[0]) <= MAX_ERROR_CHARS else lines[0][:MAX_ERROR_CHARS] + "… (--debug shows it all)"
    if schema_missing:
        line += " (is the DLQ schema there and up to date? `dlq create` creates or upgrades it)"
    return line


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """End the command with ``error: message`` on stderr, the message printed as text."""
    click.echo(f"error: {visible(message)}", err=True)
    sys.exit(code)


def closed_pipe() -> NoReturn:
    """The reader left (``dlq analyze | head``): stop quietly like any filter. Output still buffered would fail
    again when the interpreter flushes at exit, so stdout is pointed at /dev/null first."""
    with suppress(OSError, ValueError):  # not a real file (a test runner's capture): no pipe to flush into
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(EXIT_CLOSED_PIPE)


class _Group(click.Group):
    """Turns expected failures into one clear line (``--debug`` shows the traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            finally:
                sys.stdout.flush()  # a reader gone shows here, where it is handled, not in the flush at exit
        except BrokenPipeError:
            closed_pipe()
        except click.ClickException as exc:
            exc.message = visible(exc.message)  # it may quote a file name
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own control flow (--help, Ctrl-C); Exit is a RuntimeError
        except (psycopg.Error, MigrationError, EmbeddedServerError, RuntimeError, OSError, ValueError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            missing = isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedFunction)
            message = one_line(str(exc) or type(exc).__name__, schema_missing=missing)
            fail(db.redact(message, (ctx.obj or {}).get("url"), db.configured_url()))


@click.group(cls=_Group)
@click.option(
    "--database-url",
    envvar=db.URL_ENV,
    help="PostgreSQL URL, or 'embedded' (also $DLQ_DATABASE_URL); default: the embedded server.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, debug: bool) -> None:
    """Dead letter queue for event pipelines, on PostgreSQL."""
    ctx.obj = {"url": database_url, "debug": debug}


def url_of(ctx: click.Context) -> str:
    """The database this invocation uses: ``--database-url`` (or ``$DLQ_DATABASE_URL``), else, or when it says
    ``embedded``, the embedded server's."""
    return resolve_url(ctx.obj["url"])
