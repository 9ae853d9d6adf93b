"""Dagster resources: thin wrappers over the plain-Python core, configured from the UI or the environment."""

from __future__ import annotations

from typing import Any

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr

from dlq_assets.core import db


class DLQDatabase(dg.ConfigurableResource):
    """The DLQ database: ``url`` if set, else ``DLQ_DATABASE_URL``, else the embedded server (started or joined)."""

    url: str | None = Field(
        default=None, description="postgresql:// URL; empty means DLQ_DATABASE_URL, else the embedded server."
    )
    _resolved: str | None = PrivateAttr(default=None)
    _engine: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Resolved once per run (this may start the embedded server); the engine serves pandas readers.
        import sqlalchemy

        self._resolved = db.database_url(self.url)
        self._engine = sqlalchemy.create_engine(db.sqlalchemy_url(self._resolved), pool_pre_ping=True)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def resolved_url(self) -> str:
        if self._resolved is None:
            self._resolved = db.database_url(self.url)
        return self._resolved

    @property
    def engine(self) -> Any:
        """A SQLAlchemy engine (``postgresql+psycopg``) on the same database."""
        if self._engine is None:
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(db.sqlalchemy_url(self.resolved_url()), pool_pre_ping=True)
        return self._engine

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.resolved_url(), **kwargs)


# One row whether or not the breaker exists yet: a missing breaker is closed, with the table's defaults.
BREAKER_STATE_SQL = """
SELECT coalesce(b.state, 'closed') AS state, coalesce(b.failure_count, 0) AS failure_count,
       coalesce(b.failure_threshold, 5) AS failure_threshold, coalesce(b.timeout_seconds, 60) AS timeout_seconds,
       b.opened_at, b.next_attempt_time
  FROM (SELECT 1) AS one LEFT JOIN dlq_circuit_breaker_state b ON b.breaker_name = %s
"""


class CircuitBreaker(dg.ConfigurableResource):
    """A named circuit breaker whose state lives in PostgreSQL, so it holds across processes and run workers."""

    name: str = Field(default="dlq_processing", description="Breaker name (dlq_circuit_breaker_state.breaker_name).")
    failure_threshold: int | None = Field(
        default=None, ge=1, le=10000, description="Consecutive failures that open it (None: keep the stored value)."
    )
    timeout_seconds: int | None = Field(
        default=None, ge=1, le=3600, description="How long it stays open before one probe (None: keep the stored)."
    )

    def ensure(self, conn: psycopg.Connection[Any]) -> None:
        """Create the breaker, with this resource's threshold and timeout when set (the owner's or
        security_admin's to do)."""
        from dlq_assets.core.processing.worker import ensure_breaker

        ensure_breaker(conn, self.name, self.failure_threshold, self.timeout_seconds)

    def state(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        """Read only (a reader may call it): a breaker not created yet is reported closed, with the defaults."""
        cur = conn.execute(BREAKER_STATE_SQL, (self.name,))
        return dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))

    def set(self, conn: psycopg.Connection[Any], action: str) -> dict[str, Any]:
        """Manual control: ``open``, ``close`` or ``reset``."""
        conn.execute("SELECT dlq_breaker_set(%s, %s)", (self.name, action))
        return self.state(conn)
