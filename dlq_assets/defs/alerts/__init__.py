"""The DLQ's health: the asset checks, the job and schedule that evaluate them, and the alert sensors."""
