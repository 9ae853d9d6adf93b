-- Completion: the second half of the state machine. resolved | failed -> retry with backoff or poison |
-- quarantined | released, in one set-based statement fenced by the lease: a worker whose lease expired and was
-- claimed again by another changes nothing. Retry policies (dlq_retry_policies) are matched most specific
-- first: reason and error class, error class, reason, default.


-- The retry policy of a reason and error class: the one definition of the rule. A set of at most one row, STABLE,
-- with no SET clause, so PostgreSQL inlines it into the query that calls it (dlq_complete_batch looks it up for
-- every failed row); the table is schema-qualified, since an inlined body runs on its caller's search_path.
CREATE OR REPLACE FUNCTION dlq_retry_policy(p_reason text, p_error_class text) RETURNS SETOF dlq_retry_policies
    LANGUAGE sql STABLE
AS $$
    SELECT p.* FROM public.dlq_retry_policies p
     WHERE (p.reason IS NULL OR p.reason = p_reason) AND (p.error_class IS NULL OR p.error_class = p_error_class)
     ORDER BY (p.reason IS NOT NULL AND p.error_class IS NOT NULL) DESC, (p.error_class IS NOT NULL) DESC,
              (p.reason IS NOT NULL) DESC
     LIMIT 1
$$;

-- Exponential backoff with jitter and a cap: base * 2^(attempt-1), capped, then +/- jitter.
CREATE OR REPLACE FUNCTION dlq_backoff_seconds(p_attempt integer, p_base numeric, p_cap numeric, p_jitter numeric)
    RETURNS numeric
    LANGUAGE sql VOLATILE SET search_path = public, pg_temp
AS $$
    SELECT least(p_cap, p_base * power(2::numeric, least(greatest(p_attempt, 1) - 1, 60)))
           * (1 + p_jitter * (2 * random() - 1))
$$;

-- dlq_complete_batch finds each row once: the UPDATE takes its rows straight from the input, locks them itself
-- and checks ownership in its WHERE (re-checked on the newest row version, as FOR UPDATE would). The retry policy
-- matters only for failed rows, and is looked up only for them, by dlq_retry_policy (inlined: a scan of a table of
-- a handful of rows). Poisoned rows are the failed rows their policy caps: a DELETE of its own takes exactly those,
-- so the two statements never touch the same row. Finding every row a second time (a locking probe, then the
-- UPDATE by primary key) costs 5.7 ms per 1,000 rows on the benchmark's mix (benchmarks/README.md).

CREATE OR REPLACE FUNCTION dlq_complete_batch(
    p_lease         uuid,
    p_ids           bigint[],
    p_outcomes      text[],
    p_methods       text[] DEFAULT NULL,
    p_error_classes text[] DEFAULT NULL,
    p_messages      text[] DEFAULT NULL
) RETURNS TABLE (event_id bigint, final_state text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_held        boolean;
    v_journal     bigint[];
    v_worker      text;
    v_claimed_at  timestamptz;
    v_first_claim jsonb;  -- the claim entry of a first attempt, the same for most rows: built once
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
    v_held := dlq_lease_mine(p_lease);
    IF v_held THEN
        SELECT array_agg(i), min(b.worker), min(b.claimed_at) INTO v_journal, v_worker, v_claimed_at
          FROM dlq_batch_leases b CROSS JOIN LATERAL unnest(b.event_ids) i WHERE b.lease = p_lease;
    END IF;
    v_first_claim := jsonb_build_array(jsonb_build_object(
        'lease', p_lease, 'claimed_at', v_claimed_at, 'worker', v_worker, 'attempt', 1, 'as', 'transaction'));
    RETURN QUERY
    WITH input AS (
        SELECT i.id, i.outcome, i.method, coalesce(i.error_class, 'error') AS error_class, i.message
          FROM unnest(p_ids, p_outcomes, p_methods, p_error_classes, p_messages)
               AS i(id, outcome, method, error_class, message)
    ), journal AS (
        SELECT DISTINCT j.id FROM unnest(v_journal) j(id)
    ), updated AS (
        UPDATE dead_letter_events e
           SET updated_at = now(),  -- set here, the row trigger is skipped (25_event_rules.sql)
               processing_lock = NULL,
               lock_expires_at = NULL,
               last_processed_at = now(),
               processing_attempts = CASE
                   WHEN e.processing_lock IS NOT NULL THEN e.processing_attempts  -- a committed lease recorded it
                   WHEN e.retry_count = 0 AND e.processing_attempts = '[]'::jsonb THEN v_first_claim  -- no concatenation
                   ELSE e.processing_attempts || CASE WHEN e.retry_count = 0 THEN v_first_claim
                       ELSE jsonb_build_array(jsonb_build_object(
                           'lease', p_lease, 'claimed_at', v_claimed_at, 'worker', v_worker,
                           'attempt', e.retry_count + 1, 'as', 'transaction')) END END,
               resolved = i.outcome = 'resolved',
               resolved_at = CASE WHEN i.outcome = 'resolved' THEN now() END,
               resolution_method = CASE WHEN i.outcome = 'resolved' THEN left(i.method, 64) ELSE e.resolution_method END,
               retry_count = CASE WHEN i.outcome = 'failed' THEN e.retry_count + 1 ELSE e.retry_count END,
               error_history = CASE WHEN i.outcome IN ('failed', 'quarantined')
                   THEN e.error_history || jsonb_build_array(jsonb_build_object(
                       'at', now(), 'attempt', e.retry_count + 1,
                       'error_class', CASE WHEN i.outcome = 'quarantined' THEN 'checksum_mismatch' ELSE i.error_class END,
                       'message', left(i.message, 2000), 'lease', p_lease))
                   ELSE e.error_history END,
               -- A backoff counts from the failure, not from the batch's start (now(), its claim): a long batch
               -- would spend it first. None (lease_expired) is due at once, in this transaction too. No policy at
               -- all: NULL, an error.
               next_attempt_at = CASE WHEN i.outcome = 'failed' THEN (
                   SELECT CASE WHEN b.seconds = 0 THEN now() ELSE clock_timestamp() + make_interval(secs => b.seconds) END
                     FROM (SELECT (SELECT dlq_backoff_seconds(e.retry_count + 1, p.backoff_base_seconds,
                                                              p.backoff_cap_seconds, p.jitter)
                                     FROM dlq_retry_policy(e.reason, i.error_class) p)::double precision AS seconds) b)
                   ELSE e.next_attempt_at END,
               quarantined_at = CASE WHEN i.outcome = 'quarantined' THEN now() ELSE e.quarantined_at END,
               classification = CASE WHEN i.outcome = 'quarantined' AND e.classification IS DISTINCT FROM 'malicious'
                                     THEN 'tampered' ELSE e.classification END,  -- malicious stays hidden
               reason = CASE WHEN i.outcome = 'quarantined' THEN 'checksum_mismatch' ELSE e.reason END,
               metadata_json = CASE WHEN i.outcome = 'quarantined'
                   THEN coalesce(e.metadata_json, '{}'::jsonb) || jsonb_build_object('original_reason', e.reason)
                   ELSE e.metadata_json END
          FROM input i
         WHERE e.id = i.id
           AND e.id = ANY (p_ids)  -- by primary key, partition by partition (the join alone scanned them)
           AND NOT e.resolved
           AND e.quarantined_at IS NULL  -- a quarantine is never lifted by a lease, however it was taken
           AND (e.processing_lock = p_lease
                OR (v_held AND e.processing_lock IS NULL AND e.id IN (SELECT j.id FROM journal j)))
           AND (i.outcome <> 'failed' OR (  -- capped failures are the DELETE's below; with no policy at all the
                SELECT NOT p.retryable OR e.retry_count + 1 >= p.max_attempts  -- backoff is NULL: an error
                  FROM dlq_retry_policy(e.reason, i.error_class) p) IS NOT TRUE)
        RETURNING e.id, CASE WHEN i.outcome = 'failed' THEN 'retry_scheduled' ELSE i.outcome END AS state
    ), moved AS (
        DELETE FROM dead_letter_events e
         USING input i
         WHERE i.outcome = 'failed'  -- a few rows: each probed by primary key (an id list here would be
           AND e.id = i.id            -- searched again for every one of them: quadratic in a failing batch)
           AND NOT e.resolved
           AND e.quarantined_at IS NULL
           AND (e.processing_lock = p_lease
                OR (v_held AND e.processing_lock IS NULL AND e.id IN (SELECT j.id FROM journal j)))
           AND (SELECT NOT p.retryable OR e.retry_count + 1 >= p.max_attempts
                  FROM dlq_retry_policy(e.reason, i.error_class) p) IS TRUE
        RETURNING e.*,
               (SELECT CASE WHEN NOT p.retryable THEN 'non_retryable:' || i.error_class ELSE 'max_attempts' END
                  FROM dlq_retry_policy(e.reason, i.error_class) p) AS poison_reason,
               jsonb_build_object('at', now(), 'attempt', e.retry_count + 1, 'error_class', i.error_class,
                                  'message', left(i.message, 2000), 'lease', p_lease) AS history_entry,
               CASE WHEN e.processing_lock IS NOT NULL THEN '[]'::jsonb
                    WHEN e.retry_count = 0 THEN v_first_claim
                    ELSE jsonb_build_array(jsonb_build_object(
                        'lease', p_lease, 'claimed_at', v_claimed_at, 'worker', v_worker, 'attempt', e.retry_count + 1,
                        'as', 'transaction')) END AS claim_entry
    ), poisoned AS (
        INSERT INTO dlq_poison_events (
            id, ingest_id, source, source_offset, source_inode, reason, payload, metadata_json, payload_checksum,
            retry_count, error_history, processing_attempts, resolved, resolved_at, resolution_method,
            idempotency_key, processing_lock, lock_expires_at, priority, classification, quarantined_at,
            next_attempt_at, created_at, updated_at, last_processed_at, poisoned_at, poison_reason, last_error,
            redrive_count)
        SELECT m.id, m.ingest_id, m.source, m.source_offset, m.source_inode, m.reason, m.payload, m.metadata_json,
               m.payload_checksum, m.retry_count + 1, m.error_history || jsonb_build_array(m.history_entry),
               m.processing_attempts || m.claim_entry, false, NULL, NULL, m.idempotency_key, NULL, NULL, m.priority,
               m.classification, NULL, m.next_attempt_at, m.created_at, now(), now(), now(),
               m.poison_reason,
               m.history_entry,
               coalesce((m.metadata_json ->> 'redrive_count')::integer, 0)
          FROM moved m
        RETURNING id
    )
    SELECT u.id, u.state FROM updated u
    UNION ALL SELECT p.id, 'poisoned' FROM poisoned p
    UNION ALL SELECT i.id, 'not_owned' FROM input i
               WHERE i.id NOT IN (SELECT u.id FROM updated u UNION ALL SELECT p.id FROM poisoned p);
    IF v_held THEN
        DELETE FROM dlq_batch_leases WHERE lease = p_lease;
    END IF;
END
$$;

COMMENT ON FUNCTION dlq_complete_batch(p_lease uuid, p_ids bigint[], p_outcomes text[], p_methods text[], p_error_classes text[], p_messages text[]) IS 'Apply one batch''s outcomes under its lease in one statement; events the lease no longer holds are not_owned.';

-- The design's "dead letter for dead letter": record that processing an event failed, outside any lease
-- (for example a handler crash reported by a supervisor). It reaches any row by id, so only the owner
-- (operators) may call it: a processor would reach rows that row security hides from it. Counts as one failed attempt with backoff, or moves
-- the event to the poison table when the policy says so. Returns the event's final state.
CREATE OR REPLACE FUNCTION record_dlq_processing_failure(p_dlq_id bigint, p_error_type text, p_error_message text)
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
