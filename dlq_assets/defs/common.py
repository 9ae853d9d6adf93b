"""What every folder of the Dagster layer shares: the asset group, the database pool, how jobs are tagged."""

import dagster as dg

GROUP = "dlq"
POOL = "dlq_database"  # dagster.yaml limits how many steps touch the DLQ database at once
JOB_TAG = "dlq/job"  # dagster.yaml allows one run at a time per value of this tag


def asset_job(name: str, selection: dg.AssetSelection, description: str, tags: dict[str, str] | None = None):
    """An asset job tagged with its own name, so no two runs of it overlap. (Unannotated: the type
    ``define_asset_job`` returns is not part of dagster's public namespace.)"""
    return dg.define_asset_job(name, selection=selection, description=description, tags={JOB_TAG: name, **(tags or {})})


def markdown_table(headers: list[str], rows: list[tuple[object, ...]]) -> str:
    """A markdown table for asset metadata (the UI renders it)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
