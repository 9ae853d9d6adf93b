"""The heartbeat thread that keeps the current batch's lease alive while the batch is worked.

A thread of its own, so that a batch taking longer than its lease keeps it: a committed lease would otherwise
expire and be taken over, and a transaction lease's idle transaction be ended by the server.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from dlq_assets.core.processing.config import WorkerConfig


class _Heartbeat:
    """Extends the current batch's lease from its own thread every lease/3 seconds, however long a handler
    or a write takes. A committed lease is extended on the heartbeat's own connection, opened only when a batch
    first runs that long; a transaction lease by a statement on the batch's connection, which keeps the server
    from ending the transaction as idle."""

    def __init__(self, url: str, config: WorkerConfig, batch_conn: psycopg.Connection[Any] | None = None) -> None:
        self.url, self.lease_seconds, self.batch_conn = url, config.lease_seconds, batch_conn
        self.lease: uuid.UUID | None = None
        self.beats = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlq-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def holding(self, lease: uuid.UUID) -> Iterator[None]:
        with self._lock:
            self.lease = lease
        try:
            yield
        finally:
            with self._lock:
                self.lease = None

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.wait(self.lease_seconds / 3):
                with self._lock:
                    lease = self.lease
                    if lease is None:
                        continue
                    if self.batch_conn is not None:
                        self.batch_conn.execute("SELECT 1")
                    else:
                        conn = conn or psycopg.connect(self.url, autocommit=True)
                        conn.execute("SELECT dlq_heartbeat(%s, %s)", (lease, self.lease_seconds))
                    self.beats += 1
        finally:
            if conn is not None:
                conn.close()
