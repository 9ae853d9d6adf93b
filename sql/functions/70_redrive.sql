-- What a redrive with the same selection would do, without doing it (dry runs and reports).
CREATE OR REPLACE FUNCTION dlq_redrive_candidates(
    p_ids          bigint[] DEFAULT NULL,
    p_reason       text DEFAULT NULL,
    p_from         timestamptz DEFAULT NULL,
    p_to           timestamptz DEFAULT NULL,
    p_max_redrives integer DEFAULT 3
) RETURNS TABLE (event_id bigint, action text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    SELECT p.id, CASE WHEN dlq_payload_checksum(p.payload) IS DISTINCT FROM p.payload_checksum
                      THEN 'kept: payload checksum mismatch (tampered)'
                      WHEN p.redrive_count < p_max_redrives THEN 'would redrive'
                      ELSE format('kept: redriven %s times (max %s)', p.redrive_count, p_max_redrives) END
      FROM dlq_poison_events p
     WHERE (p_ids IS NULL OR p.id = ANY (p_ids))
       AND (p_reason IS NULL OR p.reason = p_reason)
       AND (p_from IS NULL OR p.poisoned_at >= p_from)
       AND (p_to IS NULL OR p.poisoned_at < p_to)
     ORDER BY p.poisoned_at, p.id
$$;

-- Redrive: move events from the poison table back to processing.
-- Selected by id, reason or poisoning time (at least one), oldest first, at most p_limit per call (the
-- caller paces the calls: the rate limit). Cycle protection: an event already redriven p_max_redrives
-- times stays put. A redriven event keeps its id, key, checksum, payload and full history (plus a
-- "redriven" entry), starts again at attempt 0, and carries its redrive count in metadata_json, so a poison
-- move later keeps counting.

CREATE OR REPLACE FUNCTION dlq_redrive(
    p_ids          bigint[] DEFAULT NULL,
    p_reason       text DEFAULT NULL,
    p_from         timestamptz DEFAULT NULL,
    p_to           timestamptz DEFAULT NULL,
    p_limit        integer DEFAULT 1000,
    p_max_redrives integer DEFAULT 3
) RETURNS TABLE (event_id bigint, action text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_move  bigint[];
    v_count integer;
BEGIN
    IF p_ids IS NULL AND p_reason IS NULL AND p_from IS NULL AND p_to IS NULL THEN
        RAISE EXCEPTION 'choose what to redrive: ids, a reason, or a time range'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 100000 OR p_max_redrives IS NULL OR p_max_redrives < 0 THEN
        RAISE EXCEPTION 'p_limit must be 1..100000 and p_max_redrives >= 0'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT coalesce(array_agg(s.id), '{}') INTO v_move
      FROM (SELECT p.id
              FROM dlq_poison_events p
             WHERE (p_ids IS NULL OR p.id = ANY (p_ids))
               AND (p_reason IS NULL OR p.reason = p_reason)
               AND (p_from IS NULL OR p.poisoned_at >= p_from)
               AND (p_to IS NULL OR p.poisoned_at < p_to)
               AND p.redrive_count < p_max_redrives
               AND dlq_payload_checksum(p.payload) = p.payload_checksum  -- tampered ones stay, never work again
             ORDER BY p.poisoned_at, p.id
             LIMIT p_limit
               FOR UPDATE SKIP LOCKED) s;
    RETURN QUERY
    WITH moved AS (
        DELETE FROM dlq_poison_events p WHERE p.id = ANY (v_move)
        RETURNING p.*
    ), inserted AS (
        INSERT INTO dead_letter_events (
            id, ingest_id, source, source_offset, source_inode, reason, payload, metadata_json, payload_checksum,
            retry_count, error_history, processing_attempts, resolved, idempotency_key, priority, classification,
            next_attempt_at, created_at, last_processed_at)
        SELECT m.id, m.ingest_id, m.source, m.source_offset, m.source_inode, m.reason, m.payload,
               coalesce(m.metadata_json, '{}'::jsonb) || jsonb_build_object('redrive_count', m.redrive_count + 1),
               m.payload_checksum, 0,
               m.error_history || jsonb_build_array(jsonb_build_object(
                   'at', now(), 'redriven', m.redrive_count + 1, 'poison_reason', m.poison_reason)),
               m.processing_attempts, false, m.idempotency_key, m.priority, m.classification, now(), m.created_at,
               m.last_processed_at
          FROM moved m
        RETURNING id
    )
    SELECT i.id, 'redriven'::text FROM inserted i;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count <> cardinality(v_move) THEN
        RAISE EXCEPTION 'redrive would lose events: % moved out of the poison table, % arrived',
            cardinality(v_move), v_count USING ERRCODE = 'internal_error';
    END IF;
END
$$;

COMMENT ON FUNCTION dlq_redrive(p_ids bigint[], p_reason text, p_from timestamp with time zone, p_to timestamp with time zone, p_limit integer, p_max_redrives integer) IS 'Move one batch of poisoned events back to processing (by ids, reason, time range), with cycle protection.';
