"""The Dagster layer loads and its schema asset materializes against real PostgreSQL."""

from __future__ import annotations

import dagster as dg
import psycopg

from dlq_assets.assets import dlq_schema
from dlq_assets.definitions import defs
from dlq_assets.migrations import discover
from dlq_assets.resources import DLQDatabase


def test_definitions_load_and_validate() -> None:
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_asset_graph().get_all_asset_keys() == {dg.AssetKey("dlq_schema")}


def test_schema_asset_materializes_and_reports_versions(empty_db_url: str) -> None:
    result = dg.materialize([dlq_schema], resources={"database": DLQDatabase(url=empty_db_url)})
    assert result.success
    (materialization,) = result.asset_materializations_for_node("dlq_schema")
    assert materialization.metadata["schema_version"].value == discover()[-1].version
    assert materialization.metadata["applied_this_run"].value == len(discover())
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regclass('dead_letter_events')").fetchone() == ("dead_letter_events",)
