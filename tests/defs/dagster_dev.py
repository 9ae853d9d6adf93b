"""`dlq dev` in a subprocess for the end-to-end tests: the webserver and the daemon on PostgreSQL storage, in a
Dagster database of the test's own, reached through the GraphQL API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

LOCATION = "dlq_assets.definitions"
REPOSITORY = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}


@dataclass(frozen=True)
class DagsterDev:
    port: int
    dagster_database: str  # Dagster's run, event and schedule storage, on the test server
    dagster_home: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        return graphql(self.port, query, variables)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(port: int, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body
    return body["data"]


def settled_asset_node(port: int, query: str, deadline: float) -> dict[str, Any]:
    """The first asset node ``query`` returns, once each of its checks has an execution for the latest
    materialization and none is in progress (or at ``deadline``): a run's SUCCESS can reach the API a moment before
    its last check's evaluation does, and the daemon's schedules may be materializing the asset again."""
    while True:
        node = graphql(port, query)["assetNodes"][0]
        executions = [c["executionForLatestMaterialization"] for c in node["assetChecksOrError"]["checks"]]
        if time.monotonic() > deadline or all(e and e["status"] != "IN_PROGRESS" for e in executions):
            return node
        time.sleep(1)


def dev_environment(db_url: str, tmp_path: Path, dagster_database: str) -> dict[str, str]:
    """What `dlq dev` (and `dlq demo --dagster`, for the same instance) reads: the DLQ, Dagster's database, the
    data dir beside which DAGSTER_HOME goes."""
    return {
        "DLQ_DATABASE_URL": db_url,
        "DLQ_DAGSTER_DATABASE": dagster_database,
        "DLQ_DATA_DIR": str(tmp_path / "pgdata"),
    }


@contextmanager
def dagster_dev(
    db_url: str,
    server_url: str,
    tmp_path: Path,
    extra_env: Mapping[str, str] | None = None,
    dagster_database: str | None = None,
) -> Iterator[DagsterDev]:
    """`dlq dev` serving until the block ends; its Dagster database (a new one unless named) is dropped afterwards."""
    dagster_database = dagster_database or f"dagster_{uuid.uuid4().hex[:10]}"
    port = free_port()
    log = tmp_path / "dagster.log"
    env = {**os.environ, **dev_environment(db_url, tmp_path, dagster_database), **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlq_assets.cli", "dev", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                graphql(port, "{ version }")
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the webserver did not come up"
                time.sleep(1)
        yield DagsterDev(port, dagster_database, tmp_path / "dagster_home", log)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C: dagster dev stops its children and exits (SIGTERM: 60 s)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dagster_database)))
