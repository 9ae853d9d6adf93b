"""The ``dlq`` command line: the operator's tools on top of the plain-Python core.

``app`` holds the click group and how failures end a command, ``output`` what the commands print with, and each
command module registers its commands on the group: importing them here makes ``main`` the complete command
(the ``dlq`` console script and ``python -m dlq_assets.cli``).
"""

from dlq_assets.cli import database, demo, inspection, intake, operations, processing  # noqa: F401  (registration)
from dlq_assets.cli.app import main

__all__ = ["main"]
