-- The DLQ at a glance, one row: counts from the health counters (sql/functions/20_counts.sql), the oldest
-- unresolved event and the leases from their indexes, so it stays fast on a big table.
CREATE OR REPLACE VIEW dlq_health AS
WITH counts AS (
    SELECT coalesce(sum(total), 0)::bigint AS total, coalesce(sum(pending), 0)::bigint AS pending,
           coalesce(sum(processed), 0)::bigint AS processed, sum(resolution_seconds) AS resolution_seconds,
           coalesce(sum(high_retry), 0)::bigint AS high_retry, coalesce(sum(malicious), 0)::bigint AS malicious,
           coalesce(sum(high_priority), 0)::bigint AS high_priority,
           coalesce(sum(quarantined), 0)::bigint AS quarantined
      FROM dlq_event_counts
), batches AS (
    SELECT count(*) FILTER (WHERE dlq_lease_holder(b.lease) IS NOT NULL) AS live_events,
           count(*) FILTER (WHERE dlq_lease_holder(b.lease) IS NULL) AS dead_events
      FROM dlq_batch_leases b CROSS JOIN LATERAL unnest(b.event_ids)
), leases AS (  -- committed leases, on their partial index
    SELECT count(*) FILTER (WHERE lock_expires_at > now()) AS live_events,
           count(*) FILTER (WHERE lock_expires_at <= now()) AS stale_events
      FROM dead_letter_events WHERE processing_lock IS NOT NULL
), oldest AS (  -- the first entry of ix_dead_letter_events_pending_since: an index probe, not a scan
    SELECT e.created_at FROM dead_letter_events e
     WHERE NOT e.resolved AND e.quarantined_at IS NULL
     ORDER BY e.created_at LIMIT 1
)
SELECT
    c.pending                                                              AS pending_events,
    c.processed                                                            AS processed_events,
    c.resolution_seconds / nullif(c.processed, 0)                          AS avg_resolution_time_seconds,
    (SELECT created_at FROM oldest)                                        AS oldest_unresolved_event,
    c.high_retry                                                           AS high_retry_events,
    (SELECT live_events FROM leases) + (SELECT live_events FROM batches)   AS locked_events,
    (SELECT stale_events FROM leases) + (SELECT dead_events FROM batches)  AS stale_locks,
    c.malicious                                                            AS malicious_events,
    c.high_priority                                                        AS high_priority_events,
    c.quarantined                                                          AS quarantined_events,
    (SELECT count(*) FROM dlq_poison_events)                               AS poisoned_events,
    c.total                                                                AS total_events
FROM counts c;
