"""Asset checks on ``dlq_processed_batches``: processing is what changes the DLQ's state, so its health is judged
there. Each check reads one ``health.snapshot`` and asks ``health.breaches`` for its verdict, so the thresholds
mean the same in Dagster, the CLI and the alerts. Page-worthy checks are blocking ERROR checks: a failure stops
downstream work in the same run.

No ``from __future__ import annotations``: Dagster reads the ``config`` annotation at decoration time."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import dagster as dg

from dlq_assets.core.operations import health
from dlq_assets.defs.processing.assets import dlq_processed_batches
from dlq_assets.defs.resources import DLQDatabase

_DEFAULTS = health.Thresholds()
WARN, ERROR = dg.AssetCheckSeverity.WARN, dg.AssetCheckSeverity.ERROR


class HealthCheckConfig(dg.Config):
    """Thresholds, overridable per check in run config; the defaults are ``health.Thresholds``."""

    high_retry_events: int = _DEFAULTS.high_retry_events
    stale_locks: int = _DEFAULTS.stale_locks
    backlog_age_seconds: float = _DEFAULTS.backlog_age_seconds
    tampered_events: int = _DEFAULTS.tampered_events
    malicious_events: int = _DEFAULTS.malicious_events
    min_success_rate: float = _DEFAULTS.min_success_rate
    success_window_minutes: int = _DEFAULTS.success_window_minutes

    def thresholds(self) -> health.Thresholds:
        return health.Thresholds(**{f.name: getattr(self, f.name) for f in fields(health.Thresholds)})


@dataclass(frozen=True)
class _Check:
    name: str
    severity: dg.AssetCheckSeverity
    description: str
    value: Callable[[health.HealthSnapshot], float | None]
    threshold: Callable[[health.Thresholds], float]
    advice: str  # markdown: what a failure means and what to do
    extra: Callable[[health.HealthSnapshot], Mapping[str, Any]] = lambda _: {}


_CHECKS = (
    _Check(
        name="high_retry_events",
        severity=WARN,
        description="Events retried more than 5 times stay under the threshold.",
        value=lambda h: h.high_retry_events,
        threshold=lambda t: t.high_retry_events,
        advice=(
            "These events keep failing the same way; backoff stops them hot-looping, but they are heading for the "
            "poison table. Read their `error_history` for the common error class, fix the handler or the target, then"
            " let them retry (or redrive them once poisoned)."
        ),
    ),
    _Check(
        name="stale_locks",
        severity=ERROR,
        description="No expired lease is still held.",
        value=lambda h: h.stale_locks,
        threshold=lambda t: t.stale_locks,
        advice=(
            "A worker claimed events and died or hung without completing them; nobody else can claim them until the "
            "lease is given back. Find the dead worker, then run `SELECT dlq_release_stale_leases()` (it counts as a "
            "failed attempt, so an event that kills workers ends up poisoned instead of looping)."
        ),
    ),
    _Check(
        name="backlog_age",
        severity=WARN,
        description="The oldest pending event is younger than the threshold.",
        value=lambda h: h.backlog_age_seconds,
        threshold=lambda t: t.backlog_age_seconds,
        advice=(
            "Pending events wait too long: the processing schedule is not running, a breaker denies work, or the "
            "workers cannot keep up. Check the recent processing runs and the breakers, then add workers or raise the"
            " batch size."
        ),
    ),
    _Check(
        name="breaker_open",
        severity=ERROR,
        description="Every circuit breaker is closed.",
        value=lambda h: len(h.open_breakers),
        threshold=lambda _: 0,
        advice=(
            "The target failed repeatedly, so workers stopped sending it events. Fix the target: the breaker "
            "half-opens after its timeout and closes when the probe succeeds. `SELECT dlq_breaker_set('<name>', "
            "'close')` forces it closed."
        ),
        extra=lambda h: {"open_breakers": dg.MetadataValue.json(h.open_breakers)},
    ),
    _Check(
        name="tampered_events",
        severity=ERROR,
        description="No stored payload fails its checksum.",
        value=lambda h: h.tampered_events,
        threshold=lambda t: t.tampered_events,
        advice=(
            "A stored payload no longer matches the checksum fixed at insert: someone changed it in the database. The"
            " events are quarantined and never reprocessed automatically. Treat it as a security incident: find who "
            "wrote them, and restore the payloads from the source."
        ),
    ),
    _Check(
        name="malicious_events",
        severity=WARN,
        description="Events classified malicious stay under the threshold.",
        value=lambda h: h.malicious_events,
        threshold=lambda t: t.malicious_events,
        advice=(
            "Structural fields of these records carry SQL or shell injection aimed at the pipeline; they are kept "
            "away from processing. Hand them to the security team and check the source that produced them."
        ),
    ),
    _Check(
        name="success_rate",
        severity=WARN,
        description="Recent batches resolve at least the minimum share of what they process.",
        value=lambda h: h.recent_success_rate,
        threshold=lambda t: t.min_success_rate,
        advice=(
            "Recent batches resolved little of what they processed: a new kind of bad data, a handler bug, or a "
            "failing target. Look at the error classes of the latest failures."
        ),
        extra=lambda h: {
            "recent_batches": h.recent_batches,
            "recent_processed": h.recent_processed,
            "recent_resolved": h.recent_resolved,
        },
    ),
)


def _ok(check: _Check, value: float | None, limits: health.Thresholds) -> str:
    """The passing verdict, including the cases with nothing to judge."""
    if value is None:
        if check.name == "success_rate":
            return f"no batches completed in the last {limits.success_window_minutes} minutes: nothing to judge"
        return "no pending events"
    return f"ok: {value:g} (threshold {check.threshold(limits):g})"


def _build(check: _Check) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=dlq_processed_batches, name=check.name, description=check.description, blocking=check.severity == ERROR
    )
    def _evaluate(config: HealthCheckConfig, database: DLQDatabase) -> dg.AssetCheckResult:
        limits = config.thresholds()
        with database.connect() as conn:
            snap = health.snapshot(conn, success_window_minutes=limits.success_window_minutes)
        problem = health.breaches(snap, limits).get(check.name)
        value = check.value(snap)
        verdict = problem or _ok(check, value, limits)
        return dg.AssetCheckResult(
            passed=problem is None,
            severity=check.severity,
            description=verdict,
            metadata={
                "value": dg.MetadataValue.null() if value is None else value,
                "threshold": check.threshold(limits),
                "explanation": dg.MetadataValue.md(f"**{verdict}**\n\n{check.advice}"),
                **check.extra(snap),
            },
        )

    return _evaluate


health_checks: list[dg.AssetChecksDefinition] = [_build(check) for check in _CHECKS]
