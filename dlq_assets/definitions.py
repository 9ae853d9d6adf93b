"""The Dagster code location (workspace.yaml loads it): assets, checks, jobs, schedules, sensors, resources."""

from __future__ import annotations

import dagster as dg

from dlq_assets.defs.assets import dlq_assets_all
from dlq_assets.defs.checks import health_checks
from dlq_assets.defs.resources import CircuitBreaker, DLQDatabase
from dlq_assets.defs.schedules import jobs, schedules
from dlq_assets.defs.sensors import backlog_sensor, check_failure_alert_sensor, run_failure_alert_sensor

defs = dg.Definitions(
    assets=dlq_assets_all,
    asset_checks=health_checks,
    jobs=jobs,
    schedules=schedules,
    sensors=[backlog_sensor, check_failure_alert_sensor, run_failure_alert_sensor],
    resources={
        # The URL is resolved when a run starts: DLQ_DATABASE_URL, else the embedded server. Nothing at import.
        "database": DLQDatabase(),
        "breaker": CircuitBreaker(),
    },
)
