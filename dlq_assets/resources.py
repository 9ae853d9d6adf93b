"""Dagster resources: thin wrappers over the plain-Python core, configured from the UI or the environment."""

from __future__ import annotations

from typing import Any

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr

from dlq_assets import db


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


class CircuitBreaker(dg.ConfigurableResource):
    """A named circuit breaker whose state lives in PostgreSQL, so it holds across processes and run workers."""

    name: str = Field(default="dlq_processing", description="Breaker name (dlq_circuit_breaker_state.breaker_name).")
    failure_threshold: int = Field(default=5, ge=1, description="Consecutive failures that open it.")
    timeout_seconds: int = Field(default=60, ge=0, description="How long it stays open before one probe.")

    def ensure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT dlq_breaker_ensure(%s, %s, %s)", (self.name, self.failure_threshold, self.timeout_seconds))

    def state(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        self.ensure(conn)
        cur = conn.execute(
            "SELECT state, failure_count, failure_threshold, timeout_seconds, opened_at, next_attempt_time "
            "FROM dlq_circuit_breaker_state WHERE breaker_name = %s",
            (self.name,),
        )
        return dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))

    def set(self, conn: psycopg.Connection[Any], action: str) -> dict[str, Any]:
        """Manual control: ``open``, ``close`` or ``reset``."""
        conn.execute("SELECT dlq_breaker_set(%s, %s)", (self.name, action))
        return self.state(conn)
