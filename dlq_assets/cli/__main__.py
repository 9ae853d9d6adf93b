"""``python -m dlq_assets.cli``: the same command as ``dlq``."""

from dlq_assets.cli import main

main()
