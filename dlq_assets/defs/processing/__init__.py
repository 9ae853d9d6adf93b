"""Working the backlog: the processed-batches asset, its job and schedule, and the backlog sensor."""
