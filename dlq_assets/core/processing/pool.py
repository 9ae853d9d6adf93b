"""Several worker processes over one backlog: starts them (fork where it is safe, spawn otherwise), shares the
event limit between them, forwards SIGTERM to each, and combines their reports. One worker runs in-process.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict
from types import FrameType
from typing import Any

from dlq_assets.core.db import database_url
from dlq_assets.core.processing.config import WorkerConfig
from dlq_assets.core.processing.report import ProcessReport
from dlq_assets.core.processing.worker import Worker


def _worker_main(url: str, config: WorkerConfig, results: Any) -> None:
    try:
        results.put(Worker(url, config).run().as_dict())
    except BaseException as exc:  # reported once, by the parent, as one line: no traceback from the child
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None


def process(url: str | None = None, config: WorkerConfig | None = None, *, workers: int = 1) -> ProcessReport:
    """Process the backlog with ``workers`` processes (one in-process when 1); returns the combined report."""
    config = config or WorkerConfig()
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if workers == 1:
        return Worker(url, config).run()
    url = database_url(url)
    share = None if config.limit is None else math.ceil(config.limit / workers)
    context = multiprocessing.get_context(start_method())
    results = context.Queue()
    procs = [
        context.Process(target=_worker_main, args=(url, _with_limit(config, share), results), daemon=True)
        for _ in range(workers)
    ]
    started = time.monotonic()
    for proc in procs:
        proc.start()

    def forward(signum: int, frame: FrameType | None) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if in_main else None
    reports: list[dict[str, Any]] = []
    try:
        while len(reports) < len(procs):
            try:
                reports.append(results.get(timeout=1))
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break  # a worker died without a report (killed): the others' reports still count
        for proc in procs:
            proc.join()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if errors := [r["error"] for r in reports if "error" in r]:
        raise RuntimeError(f"a worker failed: {errors[0]}")
    combined = ProcessReport()
    for data in reports:
        combined.merge(_report_from(data))
    combined.seconds = time.monotonic() - started
    if any(p.exitcode not in (0, None) for p in procs):
        raise RuntimeError(f"a worker exited with {[p.exitcode for p in procs]}")
    return combined


def _with_limit(config: WorkerConfig, limit: int | None) -> WorkerConfig:
    return config if limit is None else WorkerConfig(**{**asdict(config), "limit": limit})


def _report_from(data: dict[str, Any]) -> ProcessReport:
    report = ProcessReport(session_id=data["session_id"])
    for name in ("batches", "claimed", "resolved", "retried", "poisoned", "quarantined", "released", "not_owned"):
        setattr(report, name, data[name])
    report.breaker_denied = data["breaker_denied"]
    report.infrastructure_error = data["infrastructure_error"]
    report.stopped_by_signal = data["stopped_by_signal"]
    report.strategies = Counter(data["strategies"])
    report.batch_seconds = list(data["batch_seconds"])
    report.seconds = data["seconds"]
    report.peak_rss_mb = data["peak_rss_mb"]
    return report


def start_method() -> str:
    """fork when this process runs no other thread: a forked worker starts in milliseconds with its modules
    already imported, where spawn re-imports them (0.3 s per worker, 5% of a 100k-event run). With other threads
    (a Dagster run, say) spawn: a fork copies any lock another thread holds, and nothing would release it."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return "fork"
    return "spawn"
