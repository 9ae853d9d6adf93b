"""The Dagster code location: ``dagster dev -m dlq_assets.definitions`` or workspace.yaml."""

from __future__ import annotations

import dagster as dg

from dlq_assets.assets import dlq_schema
from dlq_assets.resources import DLQDatabase

defs = dg.Definitions(
    assets=[dlq_schema],
    resources={"database": DLQDatabase()},  # URL resolved at run time: DLQ_DATABASE_URL or embedded
)
