"""Dagster resources: thin wrappers over the plain-Python core, configured from the UI or the environment."""

from __future__ import annotations

from typing import Any

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr

from dlq_assets.core import db
from dlq_assets.core.operations import control, inspect


def database_failure(exc: Exception, url: str | None, *, allow_retries: bool = True) -> dg.Failure:
    """The step's failure for a database error: its message, no password of ``url`` in it."""
    return dg.Failure(description=db.redact(str(exc).strip(), url), allow_retries=allow_retries)


def resolve_database_url(url: str | None) -> str:
    """The DLQ database a code location uses: ``url``, else ``$DLQ_DATABASE_URL``; nothing else.

    ``embedded`` (:data:`dlq_assets.core.db.EMBEDDED`), in either, asks for the local embedded server by name: it
    is started or joined through :func:`dlq_assets.devtools.embedded.resolve_url`. With neither set, or with a URL
    that is not PostgreSQL's, this raises :class:`dagster.Failure` carrying the one-line reason (it names
    DLQ_DATABASE_URL, never a password): the run, check or sensor tick that needed the database fails with it,
    and no step retries it, since only a change of configuration can fix it."""
    chosen = url or db.configured_url()
    if chosen == db.EMBEDDED:
        from dlq_assets.devtools import embedded  # only a deployment that names the embedded server loads it

        return embedded.resolve_url(db.EMBEDDED)
    try:
        return db.database_url(chosen)
    except (db.DatabaseNotConfigured, ValueError) as exc:
        raise database_failure(exc, chosen, allow_retries=False) from None


class DLQDatabase(dg.ConfigurableResource):
    """The DLQ database: ``url`` if set, else ``$DLQ_DATABASE_URL``; ``embedded`` in either names the local embedded
    server. Resolved at first use, never when the definitions load: a code location with neither set loads, and
    each use of the database fails with one line naming DLQ_DATABASE_URL (see :func:`resolve_database_url`)."""

    url: str | None = Field(
        default=None,
        description=(
            "A postgresql:// URL, or `embedded` for the local embedded server. Empty: $DLQ_DATABASE_URL, which "
            "takes the same two forms; with both empty, every run, check and sensor that uses the database fails."
        ),
    )
    _resolved: str | None = PrivateAttr(default=None)

    def resolved_url(self) -> str:
        """The database's psycopg URL, resolved once per resource instance (the embedded server may start here)."""
        if self._resolved is None:
            self._resolved = resolve_database_url(self.url)
        return self._resolved

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A connection; a server that cannot be reached fails the step with one line, no password in it."""
        url = self.resolved_url()
        try:
            return psycopg.connect(url, **kwargs)
        except psycopg.OperationalError as exc:
            raise database_failure(exc, url) from None


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
        from dlq_assets.core.processing.breaker import ensure_breaker

        ensure_breaker(conn, self.name, self.failure_threshold, self.timeout_seconds)

    def state(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        """Read only (a reader may call it): a breaker not created yet is reported closed, with the defaults."""
        return inspect.breaker_state(conn, self.name)

    def set(self, conn: psycopg.Connection[Any], action: str) -> dict[str, Any]:
        """Manual control: ``open``, ``close`` or ``reset``."""
        control.set_breaker(conn, self.name, action)
        return self.state(conn)
