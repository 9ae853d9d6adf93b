"""``dlq ingest``: Cowrie logs into raw_events, and what cannot be read as an event into the DLQ."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from dlq_assets.cli.app import main, url_of
from dlq_assets.cli.display import visible
from dlq_assets.cli.output import emit, print_fields


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--batch-size", default=2000, show_default=True, type=click.IntRange(1, 50_000))
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(1, 64),
    help="Files ingested at a time, each by a process of its own (a file is always read by one).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ingest(ctx: click.Context, paths: tuple[Path, ...], batch_size: int, workers: int, as_json: bool) -> None:
    """Read Cowrie JSON logs, plain or compressed (gzip, bzip2, xz, zstd): valid events to raw_events, everything
    else to the DLQ. A damaged compressed file is reported on stderr; what it held before the damage is ingested
    and the rest becomes one dead letter, so the exit code stays 0."""
    from dlq_assets.core.intake.ingest import BEING_WRITTEN_SECONDS, expand_paths, ingest_paths

    files, _ = expand_paths(paths)
    total = sum(p.stat().st_size for p in files) or None  # bytes on disk: the bar counts compressed bytes read
    with click.progressbar(length=total or 0, label="ingest", file=sys.stderr, hidden=as_json or not total) as bar:
        report = ingest_paths(paths, url=url_of(ctx), batch_size=batch_size, on_batch=bar.update, workers=workers)
    for d in report.damaged_files:
        what = "cut short" if d["reason"] == "compressed_truncated" else "corrupt"
        path, message = visible(d["path"]), visible(d["message"])
        click.echo(f"damaged: {path}: {d['compression']} data {what} ({message}); the first "
                   f"{d['decompressed_offset']} decompressed bytes were ingested, the {d['tail_bytes']} bytes from "
                   f"compressed offset {d['compressed_offset']} on are one {d['reason']} dead letter",
                   err=True)  # fmt: skip
    for held in report.held_back:
        click.echo(f"held back: {visible(held['path'])}: {held['reason']} and the file changed in the last "
                   f"{BEING_WRITTEN_SECONDS // 60} minutes, so it is being written: the next ingest reads it from "
                   f"offset {held['offset']}", err=True)  # fmt: skip
    for new in report.rewritten_files:
        click.echo(f"rewritten: {visible(new['path'])}: truncated in place and written again since its last ingest "
                   f"({', '.join(new['why'])}): its content is read as generation {new['generation']}, keyed apart "
                   "from what was read before", err=True)  # fmt: skip
    if skipped := Counter(s["reason"] for s in report.skipped_files):
        total_skipped = sum(skipped.values())
        click.echo(f"skipped {total_skipped} director{'y entry' if total_skipped == 1 else 'y entries'}: "
                   + "; ".join(f"{n} {visible(why)}" for why, n in sorted(skipped.items())) + " (listed in --json)",
                   err=True)  # fmt: skip

    def human(d: dict[str, Any]) -> None:
        listed = ("damaged_files", "skipped_files", "held_back", "rewritten_files")
        print_fields(d | {key: len(d[key]) for key in listed})

    emit(report.as_dict(), as_json, human)
