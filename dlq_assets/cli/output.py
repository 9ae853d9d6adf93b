"""What every command prints with: JSON or a human view, key/value listings, Rich's console and a progress bar.

Values from outside go through ``display.visible`` / ``display.text`` before they reach the terminal.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import click
import psycopg
from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dlq_assets.cli.app import closed_pipe
from dlq_assets.cli.display import visible


def json_default(value: object) -> str | float:
    """JSON for what the database returns beyond JSON's types: times as ISO 8601, numerics as numbers."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def emit(data: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], None]) -> None:
    """``data`` as one JSON object (keys sorted) for ``--json``, else as ``human`` prints it."""
    if as_json:
        click.echo(json.dumps(data, default=json_default, sort_keys=True))
    else:
        human(data)


def print_fields(data: dict[str, Any]) -> None:
    """One ``key  value`` line per item, the values aligned."""
    width = max(map(len, data), default=0)
    for key, value in data.items():
        click.echo(f"{key:<{width}}  {visible(value)}")


class Console(RichConsole):
    """Rich's console, ending on a closed pipe like the rest of the command (Rich's own handler exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        closed_pipe()


@contextmanager
def polled_progress(
    url: str, label: str, total: int, done: Callable[[psycopg.Connection[Any], datetime], int], *, hidden: bool
) -> Iterator[None]:
    """A progress bar on stderr fed by a thread that asks the database how much is done: ``done(conn, started)``
    with a connection of its own and the time the bar started. The work needs no hooks, and several workers add
    up. Nothing is shown when ``hidden`` or when there is nothing to do."""
    if hidden or total <= 0:
        yield
        return
    started = datetime.now(UTC)
    stop = threading.Event()
    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
        transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(label, total=total)

        def poll() -> None:
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    while not stop.wait(0.5):
                        progress.update(task, completed=min(int(done(conn, started)), total))
            except psycopg.Error:  # the bar stops; the work's own connection reports what failed
                return

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


MAX_ID = 2**63 - 1  # bigint: ids and counts the database holds


class Finite(click.FloatRange):
    """A FloatRange that also refuses nan and infinity (click's range checks let nan through)."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number
