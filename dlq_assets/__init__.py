"""dlq_assets: a dead letter queue for event pipelines on PostgreSQL, operated through Dagster."""

from typing import Any

__all__ = ["upgrade_to_enhanced_dlq"]


def __getattr__(name: str) -> Any:
    # Lazy, so importing the package (or any submodule) stays cheap and free of database code.
    if name == "upgrade_to_enhanced_dlq":
        from dlq_assets.core.operations.legacy import upgrade_to_enhanced_dlq

        return upgrade_to_enhanced_dlq
    raise AttributeError(name)
