"""Dagster resources: thin wrappers over the plain-Python core."""

from __future__ import annotations

from typing import Any

import dagster as dg
import psycopg

from dlq_assets import db


class DLQDatabase(dg.ConfigurableResource):
    """The DLQ database: ``url`` if set, else ``DLQ_DATABASE_URL``, else the embedded server."""

    url: str | None = None

    def resolved_url(self) -> str:
        return db.database_url(self.url)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.resolved_url(), **kwargs)
