-- 0015: the (source, source_offset) index holds unresolved dead letters only.
--
-- Its readers look for unresolved neighbours (stitching, and "is an unresolved record waiting next to this
-- one"), and a completion writes a new version of every row it resolves: with the index on every row, each
-- resolution added an entry to it that nothing would ever look up. Partial, a resolved row's version goes to
-- no entry here (one index write fewer per resolved event), and the index stays the size of the backlog.
-- Records never overlap, so the nearest unresolved record is the nearest record whenever it is adjacent: the
-- probes find the same neighbours as before.

DROP INDEX ix_dead_letter_events_source_offset;
CREATE INDEX ix_dead_letter_events_source_offset ON dead_letter_events (source, source_offset) WHERE NOT resolved;

-- As in 0011, with NOT resolved inside each probe so that it can use the index.
CREATE OR REPLACE FUNCTION dlq_claim_fragment_chains(
    p_lease         uuid,
    p_ids           bigint[],
    p_window_bytes  bigint,
    p_lease_seconds integer DEFAULT 1800
) RETURNS SETOF dead_letter_events
    LANGUAGE sql SET search_path = public, pg_temp
AS $$
    WITH RECURSIVE held AS (
        SELECT coalesce(dlq_lease_holder(p_lease) = pg_backend_pid(), false) AS by_transaction
    ), mine AS (
        SELECT i.id FROM dlq_batch_leases b CROSS JOIN LATERAL unnest(b.event_ids) i(id)
         WHERE b.lease = p_lease AND (SELECT by_transaction FROM held)
    ), chain (id, source, inode, lo, hi, min_lo, max_hi) AS (
        SELECT e.id, e.source, e.source_inode, e.source_offset,
               e.source_offset + (e.metadata_json ->> 'record_bytes')::bigint,
               e.source_offset - p_window_bytes,
               e.source_offset + (e.metadata_json ->> 'record_bytes')::bigint + p_window_bytes
          FROM dead_letter_events e
         WHERE e.id = ANY (p_ids) AND e.source IS NOT NULL
           AND (e.processing_lock = p_lease
                OR (e.processing_lock IS NULL AND e.id = ANY (ARRAY(SELECT m.id FROM mine m))))
           AND e.source_offset IS NOT NULL AND jsonb_typeof(e.metadata_json -> 'record_bytes') = 'number'
        UNION
        SELECT n.id, n.source, n.source_inode, n.source_offset,
               n.source_offset + (n.metadata_json ->> 'record_bytes')::bigint, c.min_lo, c.max_hi
          FROM chain c
         CROSS JOIN LATERAL (
               (SELECT d.* FROM dead_letter_events d  -- the record right after: 1 or 2 bytes after this one ends
                 WHERE d.source = c.source AND d.source_inode IS NOT DISTINCT FROM c.inode  -- a range, not IN:
                   AND d.source_offset BETWEEN c.hi + 1 AND c.hi + 2  -- PostgreSQL 15 scanned the source for IN
                   AND d.source_offset <= c.max_hi AND NOT d.resolved  -- the partial index (sql/0015)
                 ORDER BY d.source_offset LIMIT 1)
               UNION ALL
               (SELECT d.* FROM dead_letter_events d  -- the record before, if it ends 1 or 2 bytes before this one
                 WHERE d.source = c.source AND d.source_inode IS NOT DISTINCT FROM c.inode
                   AND d.source_offset < c.lo AND d.source_offset >= c.min_lo AND NOT d.resolved
                 ORDER BY d.source_offset DESC LIMIT 1)) n
         WHERE (n.source_offset IN (c.hi + 1, c.hi + 2)
                OR n.source_offset + (n.metadata_json ->> 'record_bytes')::bigint + 1 IN (c.lo, c.lo - 1))
           AND jsonb_typeof(n.metadata_json -> 'record_bytes') = 'number'
           AND NOT n.resolved AND n.quarantined_at IS NULL
           AND (n.processing_lock IS NULL OR n.lock_expires_at <= now() OR n.processing_lock = p_lease)
    )
    UPDATE dead_letter_events e
       SET processing_lock = p_lease,
           lock_expires_at = now() + make_interval(secs => p_lease_seconds),
           last_processed_at = now(),
           processing_attempts = e.processing_attempts || jsonb_build_array(jsonb_build_object(
               'lease', p_lease, 'claimed_at', now(), 'attempt', e.retry_count + 1, 'as', 'neighbour'))
     WHERE e.id = ANY (ARRAY(
           SELECT c.id FROM dead_letter_events c  -- by primary key: the ids first, as an array; and
            WHERE c.id = ANY (ARRAY(SELECT id FROM chain EXCEPT SELECT m.id FROM mine m))
              AND c.resolved IS NOT TRUE  -- not "NOT resolved", which let PostgreSQL 15 pick the whole
              AND c.quarantined_at IS NULL  -- claimable index instead (210 ms a call at 30k rows)
              AND (c.processing_lock IS NULL OR c.lock_expires_at <= now())
              FOR UPDATE SKIP LOCKED))
    RETURNING e.*
$$;
