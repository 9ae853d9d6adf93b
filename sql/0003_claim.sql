-- 0003: claiming a batch with a lease.
-- Claimable: unresolved, not quarantined, due (next_attempt_at), and no live lease (an expired lease is
-- claimable again, so a crashed worker loses nothing). Highest priority (1) first, then oldest.
-- The ids are picked by an index scan in a sub-select that locks with SKIP LOCKED, so concurrent workers
-- never wait for or take each other's rows. The query runs through EXECUTE so it is planned with the real
-- LIMIT every time: a cached generic plan with a parameter LIMIT degrades to a full scan on large tables.

CREATE FUNCTION dlq_claim_events(
    p_limit          integer,
    p_lease_seconds  integer DEFAULT 1800,
    p_priority_max   integer DEFAULT NULL,
    p_reason         text DEFAULT NULL,
    p_worker         text DEFAULT NULL
) RETURNS SETOF dead_letter_events
    LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
DECLARE
    v_lease uuid := gen_random_uuid();
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 100000 THEN
        RAISE EXCEPTION 'p_limit must be between 1 and 100000, got %', p_limit USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_lease_seconds IS NULL OR p_lease_seconds < 1 THEN
        RAISE EXCEPTION 'p_lease_seconds must be positive, got %', p_lease_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY EXECUTE
        'UPDATE dead_letter_events e
            SET processing_lock = $1,
                lock_expires_at = now() + make_interval(secs => $2),
                last_processed_at = now(),
                processing_attempts = e.processing_attempts || jsonb_build_array(jsonb_build_object(
                    ''lease'', $1, ''claimed_at'', now(), ''worker'', $5, ''attempt'', e.retry_count + 1))
          WHERE e.id = ANY (ARRAY(
                SELECT c.id FROM dead_letter_events c
                 WHERE NOT c.resolved AND c.quarantined_at IS NULL AND c.next_attempt_at <= now()
                   AND (c.processing_lock IS NULL OR c.lock_expires_at <= now())
                   AND ($3::integer IS NULL OR c.priority <= $3)
                   AND ($4::text IS NULL OR c.reason = $4)
                 ORDER BY c.priority, c.created_at, c.id
                 LIMIT $6
                   FOR UPDATE SKIP LOCKED))
            AND NOT e.resolved AND e.quarantined_at IS NULL
            AND (e.processing_lock IS NULL OR e.lock_expires_at <= now())
        RETURNING e.*'
    USING v_lease, p_lease_seconds, p_priority_max, p_reason, p_worker, p_limit;
END
$$;

COMMENT ON FUNCTION dlq_claim_events(integer, integer, integer, text, text) IS
    'Claim up to p_limit claimable dead letters under one fresh lease (processing_lock); returns the claimed rows.';

GRANT EXECUTE ON FUNCTION dlq_claim_events(integer, integer, integer, text, text) TO dlq_processor_role;
