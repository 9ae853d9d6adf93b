-- 0006: add a source's neighbouring dead letters to a live lease, for stitching fragments back together.
-- A pretty-printed or split event leaves fragments in consecutive offsets of one source; the worker that
-- holds one of them takes the free neighbours within a byte window into the same lease (ignoring their
-- backoff: waiting for neighbours is what their backoff was for), so one completion resolves them together.

CREATE FUNCTION dlq_claim_neighbours(
    p_lease         uuid,
    p_source        text,
    p_inode         text,
    p_offset_from   bigint,
    p_offset_to     bigint,
    p_lease_seconds integer DEFAULT 1800
) RETURNS SETOF dead_letter_events
    LANGUAGE sql SET search_path = public, pg_temp
AS $$
    UPDATE dead_letter_events e
       SET processing_lock = p_lease,
           lock_expires_at = now() + make_interval(secs => p_lease_seconds),
           last_processed_at = now(),
           processing_attempts = e.processing_attempts || jsonb_build_array(jsonb_build_object(
               'lease', p_lease, 'claimed_at', now(), 'attempt', e.retry_count + 1, 'as', 'neighbour'))
     WHERE e.id = ANY (ARRAY(
           SELECT c.id FROM dead_letter_events c
            WHERE c.source = p_source AND c.source_inode IS NOT DISTINCT FROM p_inode
              AND c.source_offset BETWEEN p_offset_from AND p_offset_to
              AND NOT c.resolved AND c.quarantined_at IS NULL
              AND (c.processing_lock IS NULL OR c.lock_expires_at <= now())
            ORDER BY c.source_offset
            LIMIT 1000
              FOR UPDATE SKIP LOCKED))
    RETURNING e.*
$$;

REVOKE EXECUTE ON FUNCTION dlq_claim_neighbours(uuid, text, text, bigint, bigint, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_claim_neighbours(uuid, text, text, bigint, bigint, integer) TO dlq_processor_role;
