"""Benchmarks of the DLQ engine against real PostgreSQL (see benchmarks/README.md)."""
