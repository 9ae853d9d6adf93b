"""The Dagster code location (workspace.yaml and ``[tool.dg.project]`` load this module): every asset, check, job,
schedule, sensor and resource of ``dlq_assets.defs``, listed explicitly.

Loading it touches no database and reads no setting: the ``database`` resource resolves its URL at first use
(``DLQ_DATABASE_URL``, or ``embedded`` for the local embedded server) and fails that use, in one line, when none is
set."""

import dagster as dg

from dlq_assets.defs.alerts.checks import health_checks
from dlq_assets.defs.alerts.jobs import checks_job, checks_schedule
from dlq_assets.defs.alerts.sensors import check_failure_alert_sensor, run_failure_alert_sensor
from dlq_assets.defs.analysis.assets import dlq_failure_patterns
from dlq_assets.defs.analysis.jobs import analysis_job, analysis_schedule
from dlq_assets.defs.processing.assets import dlq_processed_batches
from dlq_assets.defs.processing.jobs import processing_job, processing_schedule
from dlq_assets.defs.processing.sensors import backlog_sensor
from dlq_assets.defs.resources import CircuitBreaker, DLQDatabase
from dlq_assets.defs.retention.assets import dlq_retention_state
from dlq_assets.defs.retention.jobs import retention_job, retention_schedule
from dlq_assets.defs.schema.assets import dlq_partitions, dlq_schema
from dlq_assets.defs.schema.jobs import partitions_job, partitions_schedule, schema_job

defs = dg.Definitions(
    assets=[dlq_schema, dlq_partitions, dlq_processed_batches, dlq_failure_patterns, dlq_retention_state],
    asset_checks=health_checks,
    jobs=[schema_job, partitions_job, processing_job, analysis_job, retention_job, checks_job],
    schedules=[partitions_schedule, processing_schedule, analysis_schedule, retention_schedule, checks_schedule],
    sensors=[backlog_sensor, check_failure_alert_sensor, run_failure_alert_sensor],
    resources={"database": DLQDatabase(), "breaker": CircuitBreaker()},
    # Every job is one asset and its checks: their steps run one after another in the run's own process, not a
    # process each (seven checks would start seven Python processes, about 2 s apiece on two cores). Processing
    # starts its own worker processes when asked for several.
    executor=dg.in_process_executor,
)
