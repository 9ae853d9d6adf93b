"""Every test runs against a real PostgreSQL server: a throwaway embedded cluster by default, or the server
``DLQ_TEST_DATABASE_URL`` names. Each test gets its own database, cloned from a migrated template."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from psycopg import sql

from dlq_assets.core.db import normalize_url, with_database
from dlq_assets.core.migrations import migrate
from dlq_assets.devtools.embedded import EmbeddedServer, remove_cluster

T = TypeVar("T")

TEST_URL_ENV = "DLQ_TEST_DATABASE_URL"
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TEST_DATA = TESTS_DIR / "data"
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"


def _create_database(server_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        statement = sql.SQL("CREATE DATABASE {} ENCODING 'UTF8'").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {} STRATEGY FILE_COPY").format(sql.Identifier(template))
        else:
            statement += sql.SQL(" TEMPLATE template0")
        conn.execute(statement)
    return with_database(server_url, name)


def _drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def cluster_dir() -> Path:
    """A data dir outside pytest's tmp rotation, which deletes old base dirs while servers still use them."""
    return Path(tempfile.mkdtemp(prefix="dlq-test-")) / "pgdata"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A URL to a maintenance database on the test server (the one to create databases from)."""
    external = os.environ.get(TEST_URL_ENV)
    if external:
        yield normalize_url(external)
        return
    data_dir = cluster_dir()
    try:
        yield EmbeddedServer(data_dir).start().url("postgres")
    finally:
        remove_cluster(data_dir)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"dlq_tpl_{uuid.uuid4().hex[:12]}"
    url = _create_database(server_url, name)
    try:
        migrate(url)
        yield name
    finally:
        _drop_database(server_url, name)


@contextlib.contextmanager
def _migrated_database(server_url: str, template_db: str) -> Iterator[str]:
    name = f"dlq_t_{uuid.uuid4().hex[:12]}"
    url = _create_database(server_url, name, template=template_db)
    try:
        yield url
    finally:
        _drop_database(server_url, name)


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh database with every migration applied, dropped after the test."""
    with _migrated_database(server_url, template_db) as url:
        yield url


@pytest.fixture
def other_db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A second one, on the same server: the same input handled another way, and the two compared."""
    with _migrated_database(server_url, template_db) as url:
        yield url


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A fresh database with nothing in it (for migration and legacy-upgrade tests)."""
    name = f"dlq_e_{uuid.uuid4().hex[:12]}"
    url = _create_database(server_url, name)
    try:
        yield url
    finally:
        _drop_database(server_url, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database-only",
        action="store_true",
        help="run only the tests that use the test server (a second pass against another server: the rest would "
        "repeat what the first pass did)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--database-only"):
        return
    uses_server = {item: "server_url" in getattr(item, "fixturenames", ()) for item in items}
    config.hook.pytest_deselected(items=[item for item, used in uses_server.items() if not used])
    items[:] = [item for item, used in uses_server.items() if used]


def left_alone(*paths: Path) -> None:
    """Date files' last change past the ingest's being-written window: a file cut short on purpose reads as finished
    (a fresh one ends as a file still being written, whose cut end a later ingest reads)."""
    from dlq_assets.core.intake.ingest import BEING_WRITTEN_SECONDS

    moment = time.time() - BEING_WRITTEN_SECONDS - 60
    for path in paths:
        os.utime(path, (moment, moment))


def at_once(count: int, work: Callable[[], T]) -> tuple[list[T], list[BaseException]]:
    """``work`` on ``count`` threads released together: what they returned, and what they raised (checked by the
    test, in its own thread)."""
    start = threading.Barrier(count)
    results: list[T] = []
    errors: list[BaseException] = []

    def one() -> None:
        start.wait()
        try:
            results.append(work())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors
