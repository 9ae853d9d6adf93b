"""The Dagster layer, one folder per concern; ``dlq_assets.definitions`` gathers it into the code location.

- ``schema/``: the migrations and the monthly partitions (assets, jobs, the daily partitions schedule)
- ``processing/``: working the backlog (asset, job, schedule, the backlog sensor that launches it early)
- ``analysis/``: failure patterns (asset, job, schedule)
- ``retention/``: deleting and dropping what expired (asset, job, schedule)
- ``alerts/``: the health checks, their job and schedule, and the sensors that report failures
- ``resources.py``: the database and the circuit breaker every folder uses
- ``common.py``: the asset group, the database pool, job tags, a markdown table for metadata
"""
