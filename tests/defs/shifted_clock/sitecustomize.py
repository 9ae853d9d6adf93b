"""Loaded at start-up by every Python process that has this folder on PYTHONPATH (the tests put it there for
`dlq dev` and the Dagster processes it starts): Dagster's clock runs ``DLQ_TEST_DAGSTER_CLOCK_OFFSET`` seconds
ahead, so the daemon reaches a schedule's next tick without waiting for it.

It shifts Dagster's own mocking points (what ``dagster._core.test_utils.freeze_time`` replaces), nothing else:
Python's clock and PostgreSQL's, which the DLQ's leases and budgets use, stay real."""

import os
from datetime import UTC

_offset = float(os.environ.get("DLQ_TEST_DAGSTER_CLOCK_OFFSET") or 0)
if _offset:
    from datetime import datetime, timedelta

    import dagster._time as _dagster_time

    _real_timestamp = _dagster_time._mockable_get_current_timestamp
    _dagster_time._mockable_get_current_datetime = lambda: datetime.now(tz=UTC) + timedelta(seconds=_offset)
    _dagster_time._mockable_get_current_timestamp = lambda: _real_timestamp() + _offset
