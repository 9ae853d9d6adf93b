"""The alert sensors against a real Dagster instance and real PostgreSQL; the webhook is a local HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dagster as dg
import psycopg
import pytest

from dlq_assets.defs.alerts import sensors
from dlq_assets.defs.alerts.checks import health_checks
from dlq_assets.defs.alerts.sensors import WEBHOOK_ENV, check_failure_alert_sensor, notify, run_failure_alert_sensor
from dlq_assets.defs.processing.jobs import RUNS_ENV, SLOT_TAG, processing_job, processing_schedule
from dlq_assets.defs.processing.sensors import BACKLOG_THRESHOLD_ENV, backlog_sensor, backlog_threshold
from dlq_assets.defs.resources import DLQDatabase


class Webhook:
    """Records every JSON body posted to it and answers with ``status``."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append({"content_type": self.headers["Content-Type"], **json.loads(body)})
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def take(self) -> list[dict[str, Any]]:
        taken, self.received[:] = list(self.received), []
        return taken


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Webhook]:
    hook = Webhook()
    thread = threading.Thread(target=hook.server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(WEBHOOK_ENV, hook.url)
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@dg.asset(name="dlq_processed_batches")
def processed_batches() -> None:
    """Stands in for the real asset: the checks judge the database."""


def materialize(db_url: str, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [processed_batches, *health_checks],
        resources={"database": DLQDatabase(url=db_url)},
        instance=instance,
        raise_on_error=False,
    )


def tick(instance: dg.DagsterInstance, cursor: str | None) -> str:
    context = dg.build_sensor_context(instance=instance, cursor=cursor)
    check_failure_alert_sensor(context)
    return context.cursor


def failed_checks(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((m["check"].split(":")[1], m["severity"]) for m in messages)


def test_notify_posts_json_with_a_slack_text_field(webhook: Webhook) -> None:
    notify({"text": "hello", "n": 1}, url=webhook.url)
    assert webhook.take() == [{"content_type": "application/json", "text": "hello", "n": 1}]
    notify({"text": "nowhere"}, url=None)
    notify({"text": "nowhere"}, url="")
    assert webhook.take() == []
    webhook.status = 500
    with pytest.raises(OSError):
        notify({"text": "boom"}, url=webhook.url)


def test_each_failed_evaluation_is_reported_once(
    db_url: str, conn: psycopg.Connection, instance: dg.DagsterInstance, webhook: Webhook
) -> None:
    conn.execute("INSERT INTO dead_letter_events (reason, payload, retry_count) VALUES ('r', '{}', 6)")
    conn.execute("SELECT dlq_breaker_set('x', 'open')")
    first = materialize(db_url, instance)

    cursor = tick(instance, None)
    sent = webhook.take()
    assert failed_checks(sent) == [("breaker_open", "ERROR"), ("high_retry_events", "WARN")]
    breaker = next(m for m in sent if m["check"].endswith("breaker_open"))
    assert breaker["run_id"] == first.run_id and breaker["kind"] == "asset_check_failed"
    assert breaker["text"].startswith("[ERROR] DLQ check dlq_processed_batches:breaker_open failed: x is open")
    assert breaker["metadata"] == {"value": 1, "threshold": 0}

    cursor = tick(instance, cursor)
    assert webhook.take() == []  # nothing new

    # The breaker closes: its passing evaluations are not reported; the retry problem persists over two runs.
    conn.execute("SELECT dlq_breaker_set('x', 'close')")
    runs = {materialize(db_url, instance).run_id, materialize(db_url, instance).run_id}
    cursor = tick(instance, cursor)
    sent = webhook.take()
    assert failed_checks(sent) == [("high_retry_events", "WARN")] * 2
    assert {m["run_id"] for m in sent} == runs
    assert tick(instance, cursor) and webhook.take() == []


def test_passing_evaluations_are_not_reported(db_url: str, instance: dg.DagsterInstance, webhook: Webhook) -> None:
    assert materialize(db_url, instance).success
    cursor = tick(instance, None)
    assert webhook.take() == []
    state = json.loads(cursor)
    assert len(state) == len(health_checks) and all(s["last"] > 0 and s["planned"] == [] for s in state.values())


def test_a_fresh_cursor_reports_the_current_state_not_the_history(
    db_url: str, conn: psycopg.Connection, instance: dg.DagsterInstance, webhook: Webhook
) -> None:
    conn.execute("SELECT dlq_breaker_set('x', 'open')")
    materialize(db_url, instance)
    materialize(db_url, instance)
    tick(instance, None)
    assert failed_checks(webhook.take()) == [("breaker_open", "ERROR")]


@pytest.mark.parametrize("broken", ["http_500", "connection_refused", "not_a_url"])
def test_a_failing_webhook_never_breaks_the_sensor_and_is_not_retried(
    db_url: str,
    conn: psycopg.Connection,
    instance: dg.DagsterInstance,
    webhook: Webhook,
    monkeypatch: pytest.MonkeyPatch,
    broken: str,
) -> None:
    conn.execute("SELECT dlq_breaker_set('x', 'open')")
    materialize(db_url, instance)
    if broken == "http_500":
        webhook.status = 500
    elif broken == "connection_refused":
        webhook.server.shutdown()
        webhook.server.server_close()
    else:
        monkeypatch.setenv(WEBHOOK_ENV, "nonsense")
    cursor = tick(instance, None)
    assert len(webhook.take()) == (1 if broken == "http_500" else 0)
    assert json.loads(cursor)["dlq_processed_batches:breaker_open"]["last"] > 0
    tick(instance, cursor)
    assert webhook.take() == []


def test_alerts_always_go_to_the_log_by_severity(
    db_url: str,
    conn: psycopg.Connection,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    calls: list[tuple[dict[str, Any], str | None]] = []
    monkeypatch.setattr(sensors, "notify", lambda message, *, url: calls.append((message, url)))
    conn.execute("INSERT INTO dead_letter_events (reason, payload, retry_count) VALUES ('r', '{}', 6)")
    conn.execute("SELECT dlq_breaker_set('x', 'open')")
    materialize(db_url, instance)
    capfd.readouterr()
    tick(instance, None)
    assert sorted((m["check"], url) for m, url in calls) == [
        ("dlq_processed_batches:breaker_open", None),
        ("dlq_processed_batches:high_retry_events", None),
    ]
    logged = [line.split(" failed:")[0] for line in capfd.readouterr().err.splitlines() if "DLQ check" in line]
    assert sorted(line.split(" - ", 2)[2] for line in logged) == [
        "ERROR - [ERROR] DLQ check dlq_processed_batches:breaker_open",
        "WARNING - [WARN] DLQ check dlq_processed_batches:high_retry_events",
    ]


def test_a_check_still_running_at_a_tick_is_reported_when_it_fails(
    db_url: str, conn: psycopg.Connection, instance: dg.DagsterInstance, webhook: Webhook
) -> None:
    conn.execute("SELECT dlq_breaker_set('x', 'open')")
    cursor = tick(instance, None)  # before any run: nothing to see
    with psycopg.connect(db_url) as blocker:
        blocker.execute("LOCK TABLE dlq_processing_metrics IN ACCESS EXCLUSIVE MODE")  # every snapshot waits
        run = threading.Thread(target=materialize, args=(db_url, instance))
        run.start()
        breaker_key = next(k for k in sensors.CHECK_KEYS if k.name == "breaker_open")
        deadline = time.monotonic() + 60
        while not instance.event_log_storage.get_asset_check_execution_history(breaker_key, limit=1):
            assert time.monotonic() < deadline, "the run never planned its checks"
            time.sleep(0.05)
        cursor = tick(instance, cursor)
        assert webhook.take() == []
        assert json.loads(cursor)["dlq_processed_batches:breaker_open"]["planned"]
    run.join(timeout=120)
    cursor = tick(instance, cursor)
    assert failed_checks(webhook.take()) == [("breaker_open", "ERROR")]
    assert all(not s["planned"] for s in json.loads(cursor).values())


def test_a_check_whose_run_ended_without_it_is_forgotten(
    db_url: str, instance: dg.DagsterInstance, webhook: Webhook
) -> None:
    """The upstream step fails, so the run ends with its checks planned and never evaluated: the run-failure
    sensor reports that run; this one reports nothing and keeps no planned id for it."""

    @dg.asset(name="dlq_processed_batches")
    def broken_batches() -> None:
        raise RuntimeError("the worker crashed")

    result = dg.materialize(
        [broken_batches, *health_checks],
        resources={"database": DLQDatabase(url=db_url)},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    breaker_key = next(k for k in sensors.CHECK_KEYS if k.name == "breaker_open")
    (planned,) = instance.event_log_storage.get_asset_check_execution_history(breaker_key, limit=10)
    assert not isinstance(planned.evaluation, dg.AssetCheckEvaluation) and planned.run_id == result.run_id
    cursor = tick(instance, None)
    assert webhook.take() == []
    state = json.loads(cursor)
    assert all(s["planned"] == [] for s in state.values())
    assert state["dlq_processed_batches:breaker_open"]["last"] == planned.id


def test_a_failed_run_is_reported(instance: dg.DagsterInstance, webhook: Webhook) -> None:
    @dg.asset
    def broken_asset() -> None:
        raise RuntimeError("the target is down")

    result = dg.materialize([broken_asset], instance=instance, raise_on_error=False)
    assert not result.success
    context = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert_sensor",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    ).for_run_failure()
    run_failure_alert_sensor(context)
    (sent,) = webhook.take()
    assert sent["kind"] == "run_failed" and sent["run_id"] == result.run_id and sent["severity"] == "ERROR"
    assert sent["failed_steps"] and sent["failed_steps"][0].startswith("broken_asset: ")
    assert "the target is down" in sent["text"]

    webhook.status = 500
    run_failure_alert_sensor(context)  # a failing webhook is logged, not raised


def test_the_backlog_sensor_fills_the_free_processing_slots_past_the_threshold(
    db_url: str, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlq_assets.definitions import defs

    monkeypatch.setenv(BACKLOG_THRESHOLD_ENV, "5")
    monkeypatch.setenv(RUNS_ENV, "3")
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(4):
            conn.execute("INSERT INTO dead_letter_events (reason, payload) VALUES ('x', %s)", (json.dumps({"n": i}),))

        def evaluate() -> Any:
            with dg.build_sensor_context(
                instance=instance, resources={"database": DLQDatabase(url=db_url)}, definitions=defs
            ) as context:
                return backlog_sensor(context)

        assert isinstance(evaluate(), dg.SkipReason)  # 4 due, threshold 5
        for i in range(8, 20):  # pending but waiting out a retry backoff: nothing for a run to do
            conn.execute(
                "INSERT INTO dead_letter_events (reason, payload, next_attempt_at) VALUES ('x', %s, now() + '1 hour')",
                (json.dumps({"n": i}),),
            )
        waiting = evaluate()
        assert isinstance(waiting, dg.SkipReason) and "4 dead letters due now (16 pending)" in waiting.skip_message
        for i in range(4, 8):
            conn.execute("INSERT INTO dead_letter_events (reason, payload) VALUES ('x', %s)", (json.dumps({"n": i}),))
    requests = evaluate()
    assert [r.tags["dlq/job"] for r in requests] == [f"{processing_job.name}:{k}" for k in (1, 2, 3)]
    assert {r.tags["dlq/pending"] for r in requests} == {"20"} and requests[0].tags[SLOT_TAG] == "1/3"
    assert backlog_sensor.job_name == processing_job.name  # the requests launch the job the sensor targets
    # Slot 2 busy: the sensor fills slots 1 and 3 only.
    busy = {"dlq/job": f"{processing_job.name}:2"}
    instance.add_run(
        dg.DagsterRun(job_name=processing_job.name, run_id="r2", status=dg.DagsterRunStatus.STARTED, tags=busy)
    )
    assert [r.tags["dlq/job"] for r in evaluate()] == [f"{processing_job.name}:{k}" for k in (1, 3)]
    # Three runs active (one launched by hand, without a slot): no more.
    for run_id, tags in (("r1", {"dlq/job": f"{processing_job.name}:1"}), ("manual", {})):
        instance.add_run(
            dg.DagsterRun(job_name=processing_job.name, run_id=run_id, status=dg.DagsterRunStatus.STARTING, tags=tags)
        )
    skipped = evaluate()
    assert isinstance(skipped, dg.SkipReason) and "3 processing runs are already active" in skipped.skip_message
    monkeypatch.setenv(RUNS_ENV, "zero")
    with pytest.raises(ValueError, match="DLQ_PROCESSING_RUNS must be a whole number from 1 to 16, not 'zero'"):
        evaluate()


@pytest.mark.parametrize(("setting", "slots"), [(None, 2), ("1", 1), ("4", 4), (" 16 ", 16)])
def test_the_processing_schedule_asks_for_one_run_per_slot(
    setting: str | None, slots: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if setting is None:
        monkeypatch.delenv(RUNS_ENV, raising=False)
    else:
        monkeypatch.setenv(RUNS_ENV, setting)
    with dg.build_schedule_context() as context:
        requests = processing_schedule(context)
    assert [r.run_key for r in requests] == [f"slot-{k}" for k in range(1, slots + 1)]
    assert len({r.tags["dlq/job"] for r in requests}) == slots  # one run at a time per slot (dagster.yaml)
    assert requests[-1].tags[SLOT_TAG] == f"{slots}/{slots}"


@pytest.mark.parametrize("setting", ["0", "17", "-1", "2.5", "two", "\u0663", "99999999999999999999"])
def test_a_processing_runs_setting_out_of_range_fails_the_tick_with_its_name(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RUNS_ENV, setting)
    with dg.build_schedule_context() as context, pytest.raises(ValueError, match=f"{RUNS_ENV} .* not '{setting}'"):
        processing_schedule(context)


@pytest.mark.parametrize("setting", ["-5", "1e3", "abc", "\u0663"])
def test_a_backlog_threshold_that_is_no_whole_number_fails_naming_it(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BACKLOG_THRESHOLD_ENV, setting)
    with pytest.raises(ValueError, match=f"{BACKLOG_THRESHOLD_ENV} must be a whole number of dead letters"):
        backlog_threshold()
