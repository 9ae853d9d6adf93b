"""Failure patterns of the DLQ: the asset, its job and its hourly schedule."""
