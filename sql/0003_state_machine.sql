-- 0003: the processing state machine every client shares.
-- claim -> heartbeat* -> complete (resolved | failed -> retry with backoff or poison | quarantined |
-- released). Completion is one set-based statement fenced by the lease: a worker whose lease expired and was
-- claimed again by another worker changes nothing. Expired leases count as a failed attempt
-- (error class lease_expired, retried at once by default), so an event that kills its worker every time ends
-- in the poison table instead of looping forever.

-- Retry policy per reason and error class; the most specific row wins (reason+class, class, reason, default).
CREATE TABLE dlq_retry_policies (
    id                   serial PRIMARY KEY,
    reason               varchar(128),
    error_class          varchar(128),
    max_attempts         integer NOT NULL DEFAULT 10,
    backoff_base_seconds numeric NOT NULL DEFAULT 30,
    backoff_cap_seconds  numeric NOT NULL DEFAULT 3600,
    jitter               numeric NOT NULL DEFAULT 0.2,
    retryable            boolean NOT NULL DEFAULT true,
    CONSTRAINT dlq_retry_policies_one_per_pair UNIQUE NULLS NOT DISTINCT (reason, error_class),
    CONSTRAINT dlq_retry_policies_sane CHECK (
        max_attempts BETWEEN 1 AND 1000 AND backoff_base_seconds >= 0
        AND backoff_cap_seconds >= backoff_base_seconds AND jitter BETWEEN 0 AND 1)
);
COMMENT ON TABLE dlq_retry_policies IS
    'Retry policy per (reason, error_class); NULL matches any. Most specific match wins.';

INSERT INTO dlq_retry_policies (reason, error_class, max_attempts, backoff_base_seconds, backoff_cap_seconds, jitter,
                                retryable) VALUES
    (NULL, NULL,             10, 30,   3600,  0.2, true),   -- the design: exponential backoff, max 10 attempts
    (NULL, 'lease_expired',  10, 0,    0,     0,   true),   -- a crashed worker: retry at once, still counted
    (NULL, 'unrepairable',   3,  3600, 86400, 0.2, true),   -- bad bytes: wait for neighbouring fragments, then poison
    (NULL, 'invalid_event',  3,  3600, 86400, 0.2, true),
    (NULL, 'handler_missing', 1, 0,    0,     0,   false);  -- nobody can process this reason: poison at once

CREATE FUNCTION dlq_retry_policy(p_reason text, p_error_class text) RETURNS dlq_retry_policies
    LANGUAGE sql STABLE SET search_path = public, pg_temp
AS $$
    SELECT p.* FROM dlq_retry_policies p
     WHERE (p.reason IS NULL OR p.reason = p_reason) AND (p.error_class IS NULL OR p.error_class = p_error_class)
     ORDER BY (p.reason IS NOT NULL AND p.error_class IS NOT NULL) DESC, (p.error_class IS NOT NULL) DESC,
              (p.reason IS NOT NULL) DESC
     LIMIT 1
$$;

-- Exponential backoff with jitter and a cap: base * 2^(attempt-1), capped, then +/- jitter.
CREATE FUNCTION dlq_backoff_seconds(p_attempt integer, p_base numeric, p_cap numeric, p_jitter numeric)
    RETURNS numeric
    LANGUAGE sql VOLATILE SET search_path = public, pg_temp
AS $$
    SELECT least(p_cap, p_base * power(2::numeric, least(greatest(p_attempt, 1) - 1, 60)))
           * (1 + p_jitter * (2 * random() - 1))
$$;

-- Extend a live lease; returns how many events it still holds (0: the lease was lost).
CREATE FUNCTION dlq_heartbeat(p_lease uuid, p_lease_seconds integer DEFAULT 1800) RETURNS integer
    LANGUAGE sql SET search_path = public, pg_temp
AS $$
    WITH extended AS (
        UPDATE dead_letter_events
           SET lock_expires_at = now() + make_interval(secs => p_lease_seconds)
         WHERE processing_lock = p_lease AND NOT resolved
        RETURNING 1)
    SELECT count(*)::integer FROM extended
$$;

-- The outcome of a batch, applied in one statement. Arrays are parallel: one entry per event.
--   outcome: resolved | failed | quarantined | released
-- Returns each event's final state: resolved, retry_scheduled, poisoned, quarantined, released, or
-- not_owned (the lease no longer holds it: fenced).
CREATE FUNCTION dlq_complete_batch(
    p_lease         uuid,
    p_ids           bigint[],
    p_outcomes      text[],
    p_methods       text[] DEFAULT NULL,
    p_error_classes text[] DEFAULT NULL,
    p_messages      text[] DEFAULT NULL
) RETURNS TABLE (event_id bigint, final_state text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
BEGIN
    IF p_lease IS NULL THEN
        RAISE EXCEPTION 'a lease is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_ids) <> cardinality(p_outcomes) THEN
        RAISE EXCEPTION 'p_ids and p_outcomes differ in length (% vs %)', cardinality(p_ids), cardinality(p_outcomes)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_outcomes) o
                WHERE o IS NULL OR o NOT IN ('resolved', 'failed', 'quarantined', 'released')) THEN
        RAISE EXCEPTION 'outcomes must be resolved, failed, quarantined or released'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH input AS (
        SELECT i.id, i.outcome, i.method, coalesce(i.error_class, 'error') AS error_class, i.message
          FROM unnest(p_ids, p_outcomes, p_methods, p_error_classes, p_messages)
               AS i(id, outcome, method, error_class, message)
    ), owned AS (
        SELECT e.id, e.created_at, e.retry_count, e.reason, i.outcome, i.method, i.error_class, i.message
          FROM dead_letter_events e
          JOIN input i ON i.id = e.id
         WHERE e.processing_lock = p_lease AND NOT e.resolved
           AND e.quarantined_at IS NULL  -- a quarantine is never lifted by a lease, however it was taken
           FOR UPDATE OF e
    ), decided AS (
        SELECT o.*, o.retry_count + 1 AS attempt, pol.max_attempts, pol.backoff_base_seconds,
               pol.backoff_cap_seconds, pol.jitter,
               CASE o.outcome
                   WHEN 'failed' THEN CASE WHEN NOT pol.retryable OR o.retry_count + 1 >= pol.max_attempts
                                           THEN 'poisoned' ELSE 'retry_scheduled' END
                   ELSE o.outcome END AS state,
               CASE WHEN NOT pol.retryable THEN 'non_retryable:' || o.error_class ELSE 'max_attempts' END
                   AS poison_reason,
               jsonb_build_object('at', now(), 'attempt', o.retry_count + 1, 'error_class', o.error_class,
                                  'message', left(o.message, 2000), 'lease', p_lease) AS history_entry
          FROM owned o
         CROSS JOIN LATERAL dlq_retry_policy(o.reason, o.error_class) pol
    ), updated AS (
        UPDATE dead_letter_events e
           SET processing_lock = NULL,
               lock_expires_at = NULL,
               last_processed_at = now(),
               resolved = d.state = 'resolved',
               resolved_at = CASE WHEN d.state = 'resolved' THEN now() END,
               resolution_method = CASE WHEN d.state = 'resolved' THEN left(d.method, 64) ELSE e.resolution_method END,
               retry_count = CASE WHEN d.state = 'retry_scheduled' THEN d.attempt ELSE e.retry_count END,
               error_history = CASE
                   WHEN d.state = 'retry_scheduled' THEN e.error_history || jsonb_build_array(d.history_entry)
                   WHEN d.state = 'quarantined' THEN e.error_history || jsonb_build_array(
                       d.history_entry || jsonb_build_object('error_class', 'checksum_mismatch'))
                   ELSE e.error_history END,
               next_attempt_at = CASE WHEN d.state = 'retry_scheduled'
                   THEN now() + make_interval(secs => dlq_backoff_seconds(d.attempt, d.backoff_base_seconds,
                                                                          d.backoff_cap_seconds, d.jitter)::double precision)
                   ELSE e.next_attempt_at END,
               quarantined_at = CASE WHEN d.state = 'quarantined' THEN now() ELSE e.quarantined_at END,
               classification = CASE WHEN d.state = 'quarantined' AND e.classification IS DISTINCT FROM 'malicious'
                                     THEN 'tampered' ELSE e.classification END,  -- malicious stays hidden
               reason = CASE WHEN d.state = 'quarantined' THEN 'checksum_mismatch' ELSE e.reason END,
               metadata_json = CASE WHEN d.state = 'quarantined'
                   THEN coalesce(e.metadata_json, '{}'::jsonb) || jsonb_build_object('original_reason', e.reason)
                   ELSE e.metadata_json END
          FROM decided d
         WHERE e.id = d.id AND e.created_at = d.created_at AND d.state <> 'poisoned'
        RETURNING e.id, d.state
    ), moved AS (
        DELETE FROM dead_letter_events e
         USING decided d
         WHERE e.id = d.id AND e.created_at = d.created_at AND d.state = 'poisoned'
        RETURNING e.*, d.attempt, d.history_entry, d.poison_reason
    ), poisoned AS (
        INSERT INTO dlq_poison_events (
            id, ingest_id, source, source_offset, source_inode, reason, payload, metadata_json, payload_checksum,
            retry_count, error_history, processing_attempts, resolved, resolved_at, resolution_method,
            idempotency_key, processing_lock, lock_expires_at, priority, classification, quarantined_at,
            next_attempt_at, created_at, updated_at, last_processed_at, poisoned_at, poison_reason, last_error,
            redrive_count)
        SELECT m.id, m.ingest_id, m.source, m.source_offset, m.source_inode, m.reason, m.payload, m.metadata_json,
               m.payload_checksum, m.attempt, m.error_history || jsonb_build_array(m.history_entry),
               m.processing_attempts, false, NULL, NULL, m.idempotency_key, NULL, NULL, m.priority,
               m.classification, NULL, m.next_attempt_at, m.created_at, now(), now(), now(),
               m.poison_reason,
               m.history_entry,
               coalesce((m.metadata_json ->> 'redrive_count')::integer, 0)
          FROM moved m
        RETURNING id
    )
    SELECT u.id, u.state FROM updated u
    UNION ALL SELECT p.id, 'poisoned' FROM poisoned p
    UNION ALL SELECT i.id, 'not_owned' FROM input i WHERE i.id NOT IN (SELECT o.id FROM owned o);
END
$$;

COMMENT ON FUNCTION dlq_complete_batch(uuid, bigint[], text[], text[], text[], text[]) IS
    'Apply one batch''s outcomes under its lease in one statement; events the lease no longer holds are not_owned.';

-- Give back expired leases: each counts as a failed attempt (lease_expired), so a worker-killing event is
-- poisoned after the cap instead of looping. Returns how many leases were released.
CREATE FUNCTION dlq_release_stale_leases() RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_lease   uuid;
    v_ids     bigint[];
    v_total   integer := 0;
BEGIN
    FOR v_lease, v_ids IN
        SELECT processing_lock, array_agg(id)
          FROM dead_letter_events
         WHERE processing_lock IS NOT NULL AND lock_expires_at <= now() AND NOT resolved
         GROUP BY processing_lock
    LOOP
        PERFORM dlq_complete_batch(v_lease, v_ids, array_fill('failed'::text, ARRAY[cardinality(v_ids)]),
                                   NULL, array_fill('lease_expired'::text, ARRAY[cardinality(v_ids)]),
                                   array_fill('the lease expired before the batch completed'::text,
                                              ARRAY[cardinality(v_ids)]));
        v_total := v_total + cardinality(v_ids);
    END LOOP;
    RETURN v_total;
END
$$;

-- The design's "dead letter for dead letter": record that processing an event failed, outside any lease
-- (for example a handler crash reported by a supervisor). It reaches any row by id, so only the owner
-- (operators) may call it: a processor would reach rows that row security hides from it. Counts as one failed attempt with backoff, or moves
-- the event to the poison table when the policy says so. Returns the event's final state.
CREATE FUNCTION record_dlq_processing_failure(p_dlq_id bigint, p_error_type text, p_error_message text)
    RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_lease uuid := gen_random_uuid();
    v_state text;
BEGIN
    UPDATE dead_letter_events
       SET processing_lock = v_lease, lock_expires_at = now() + interval '1 minute'
     WHERE id = p_dlq_id AND NOT resolved AND quarantined_at IS NULL
       AND (processing_lock IS NULL OR lock_expires_at <= now());
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dead letter % is unknown, resolved, quarantined or leased by a live worker', p_dlq_id
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT final_state INTO v_state
      FROM dlq_complete_batch(v_lease, ARRAY[p_dlq_id], ARRAY['failed'], NULL, ARRAY[p_error_type],
                              ARRAY[p_error_message]);
    RETURN v_state;
END
$$;

-- Claiming a batch with a lease.
-- Claimable: unresolved, not quarantined, due (next_attempt_at), and no live lease (an expired lease is
-- claimable again, so a crashed worker loses nothing). Highest priority (1) first, then oldest.
-- The ids are picked by an index scan in a sub-select that locks with SKIP LOCKED, so concurrent workers
-- never wait for or take each other's rows. The query runs through EXECUTE so it is planned with the real
-- LIMIT every time: a cached generic plan with a parameter LIMIT degrades to a full scan on large tables.
-- Stale leases are released first (each counted as a failed attempt), then the batch is claimed.
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
    IF EXISTS (SELECT 1 FROM dead_letter_events
                WHERE processing_lock IS NOT NULL AND lock_expires_at <= now() AND NOT resolved) THEN
        PERFORM dlq_release_stale_leases();
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

GRANT SELECT ON dlq_retry_policies TO dlq_processor_role, dlq_reader, security_admin;
GRANT EXECUTE ON FUNCTION dlq_heartbeat(uuid, integer) TO dlq_processor_role;
GRANT EXECUTE ON FUNCTION dlq_complete_batch(uuid, bigint[], text[], text[], text[], text[]) TO dlq_processor_role;
GRANT EXECUTE ON FUNCTION dlq_release_stale_leases() TO dlq_processor_role;
REVOKE EXECUTE ON FUNCTION dlq_claim_events(integer, integer, integer, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dlq_heartbeat(uuid, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dlq_complete_batch(uuid, bigint[], text[], text[], text[], text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dlq_release_stale_leases() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION record_dlq_processing_failure(bigint, text, text) FROM PUBLIC;
