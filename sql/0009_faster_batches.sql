-- 0009: cheaper batches for the Python worker (measured in benchmarks/README.md).
--
-- 1. The claimable index gains next_attempt_at as its last key column. Events waiting out a backoff stay in the
-- partial index (it cannot depend on now()), and they gather at its front: each claim walked past every one of
-- them, fetching each from the heap to read next_attempt_at (at 1M dead letters with 110k waiting, 190 ms per
-- claim). With the column in the index, "next_attempt_at <= now()" is checked on the index entry itself. Same
-- order (priority, created_at, id), same predicate, same name; the old index goes.
CREATE INDEX ix_dead_letter_events_claimable_due ON dead_letter_events (priority, created_at, id, next_attempt_at)
    WHERE NOT resolved AND quarantined_at IS NULL;
DROP INDEX ix_dead_letter_events_claimable;
ALTER INDEX ix_dead_letter_events_claimable_due RENAME TO ix_dead_letter_events_claimable;

-- 2. The neighbours of a whole batch in one statement, and only those that can stitch.
-- The worker claimed stitching neighbours one unrepaired event at a time (dlq_claim_neighbours: a statement and a
-- commit per event), and took every free dead letter within the byte window, most of which could never join the
-- event: fragments of one record are contiguous in their file (each starts 1 or 2 bytes, a newline, after the
-- previous one ends), and stitch_fragments joins nothing else. This claims, for all of a batch's events at once,
-- the free dead letters that continue their chains of contiguous records within the window: same source and
-- inode, unresolved, not quarantined, no live lease (backoff ignored), SKIP LOCKED. A chain runs through records
-- this lease already holds and stops at anything else (a resolved, quarantined or foreign-leased record, a gap).
-- Records without a record_bytes length cannot be placed in a chain and are not taken.

CREATE FUNCTION dlq_claim_fragment_chains(
    p_lease         uuid,
    p_ids           bigint[],
    p_window_bytes  bigint,
    p_lease_seconds integer DEFAULT 1800
) RETURNS SETOF dead_letter_events
    LANGUAGE sql SET search_path = public, pg_temp
AS $$
    WITH RECURSIVE chain (id, source, inode, lo, hi, min_lo, max_hi) AS (
        SELECT e.id, e.source, e.source_inode, e.source_offset,
               e.source_offset + (e.metadata_json ->> 'record_bytes')::bigint,
               e.source_offset - p_window_bytes,
               e.source_offset + (e.metadata_json ->> 'record_bytes')::bigint + p_window_bytes
          FROM dead_letter_events e
         WHERE e.id = ANY (p_ids) AND e.processing_lock = p_lease AND e.source IS NOT NULL
           AND e.source_offset IS NOT NULL AND jsonb_typeof(e.metadata_json -> 'record_bytes') = 'number'
        UNION
        SELECT n.id, n.source, n.source_inode, n.source_offset,
               n.source_offset + (n.metadata_json ->> 'record_bytes')::bigint, c.min_lo, c.max_hi
          FROM chain c
         CROSS JOIN LATERAL (
               (SELECT d.* FROM dead_letter_events d  -- the record right after: 1 or 2 bytes after this one ends
                 WHERE d.source = c.source AND d.source_inode IS NOT DISTINCT FROM c.inode
                   AND d.source_offset IN (c.hi + 1, c.hi + 2) AND d.source_offset <= c.max_hi
                 ORDER BY d.source_offset LIMIT 1)
               UNION ALL
               (SELECT d.* FROM dead_letter_events d  -- the record before, if it ends 1 or 2 bytes before this one
                 WHERE d.source = c.source AND d.source_inode IS NOT DISTINCT FROM c.inode
                   AND d.source_offset < c.lo AND d.source_offset >= c.min_lo
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
           SELECT c.id FROM dead_letter_events c
            WHERE c.id IN (SELECT id FROM chain) AND NOT c.resolved AND c.quarantined_at IS NULL
              AND (c.processing_lock IS NULL OR c.lock_expires_at <= now())
              FOR UPDATE SKIP LOCKED))
    RETURNING e.*
$$;

COMMENT ON FUNCTION dlq_claim_fragment_chains(uuid, bigint[], bigint, integer) IS
    'Add to a live lease the free dead letters contiguous with its events p_ids (within p_window_bytes).';

REVOKE EXECUTE ON FUNCTION dlq_claim_fragment_chains(uuid, bigint[], bigint, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_claim_fragment_chains(uuid, bigint[], bigint, integer) TO dlq_processor_role;
