"""Retention: the asset that deletes and drops what expired, its job and its daily schedule."""
