"""The DLQ's schema (every migration in sql/) and its monthly partitions."""
