-- Processing inside the database: the design's process_dlq_events_enhanced, callable from psql
-- (SELECT * FROM process_dlq_events_enhanced(1000);) or a scheduler that only speaks SQL. It takes the dead
-- letters whose payload needs no repair (a transient failure: the event was valid, the write failed): claim with
-- a committed lease, verify the checksum, revalidate against the Cowrie rules (10_cowrie.sql), write to
-- raw_events idempotently, and complete the batch (50_completion.sql), with a metrics row and the breaker
-- consulted for every event. Repairs (split, stitched, cut records) are the Python worker's: this path leaves
-- what it cannot verify as it found it, failed with backoff.

CREATE OR REPLACE FUNCTION process_dlq_events_enhanced(
    p_limit                integer DEFAULT 1000,
    p_reason_filter        text DEFAULT NULL,
    p_priority_filter      integer DEFAULT NULL,
    p_circuit_breaker_name text DEFAULT 'dlq_processing',
    p_pause_every          integer DEFAULT 100,
    p_pause_seconds        double precision DEFAULT 0.01
) RETURNS TABLE (processed integer, repaired integer, failed integer, skipped integer, quarantined integer,
                 poisoned integer, circuit_breaker_triggered boolean, duration_ms integer)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_started     timestamptz := clock_timestamp();
    v_session     text := 'sql:' || gen_random_uuid();
    v_lease       uuid := gen_random_uuid();
    v_decision    text;
    v_probe       uuid;
    v_tripped     boolean := false;
    v_successes   integer := 0;
    v_count       integer := 0;
    v_row         record;
    v_errors      text[];
    v_claimed     bigint[] := '{}';
    v_ids         bigint[] := '{}';
    v_outcomes    text[] := '{}';
    v_methods     text[] := '{}';
    v_classes     text[] := '{}';
    v_messages    text[] := '{}';
    v_write       bigint[] := '{}';
    v_sources     text[];
    v_inodes      text[];
    v_offsets     bigint[];
    v_missing     bigint[];
    v_states      jsonb;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 100000 THEN
        RAISE EXCEPTION 'p_limit must be between 1 and 100000, got %', p_limit USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM dlq_check_priority_max(p_priority_filter);
    SELECT a.decision, a.probe INTO v_decision, v_probe FROM dlq_breaker_acquire(p_circuit_breaker_name) a;
    IF v_decision = 'deny' THEN
        INSERT INTO dlq_processing_metrics (processing_session_id, processing_method, batch_size, processed_count,
            repaired_count, failed_count, skipped_count, processing_duration_ms, circuit_breaker_name,
            circuit_breaker_triggered, started_at, completed_at)
        VALUES (v_session, 'stored_procedure', 0, 0, 0, 0, 0,
                (extract(epoch FROM clock_timestamp() - v_started) * 1000)::integer, p_circuit_breaker_name, true,
                v_started, clock_timestamp());
        RETURN QUERY SELECT 0, 0, 0, 0, 0, 0, true, (extract(epoch FROM clock_timestamp() - v_started) * 1000)::integer;
        RETURN;
    END IF;

    IF EXISTS (SELECT 1 FROM dead_letter_events
                WHERE processing_lock IS NOT NULL AND lock_expires_at <= now() AND NOT resolved) THEN
        PERFORM dlq_release_stale_leases();
    END IF;
    -- Claim only dead letters stored as JSON (no repair needed); raw text waits for the Python worker.
    -- Never malicious ones: this function runs as its owner, and their payloads would reach raw_events,
    -- which processors read.
    FOR v_row IN EXECUTE format(
        'UPDATE dead_letter_events e
            SET processing_lock = $4, lock_expires_at = clock_timestamp() + interval ''30 minutes'',
                last_processed_at = now(),
                processing_attempts = e.processing_attempts || jsonb_build_array(jsonb_build_object(
                    ''lease'', $4, ''claimed_at'', now(), ''worker'', ''process_dlq_events_enhanced'',
                    ''attempt'', e.retry_count + 1))
          WHERE e.id = ANY (ARRAY(%s))
        RETURNING e.id, e.priority, e.created_at, e.payload, e.payload_checksum',
        dlq_due_events_sql('c.id', '(c.processing_lock IS NULL OR c.lock_expires_at <= now())
                                    AND coalesce(c.metadata_json ->> ''payload_form'', ''json'') = ''json'''))
        USING p_priority_filter, p_reason_filter, CASE WHEN v_decision = 'probe' THEN 1 ELSE p_limit END, v_lease
    LOOP
        v_claimed := v_claimed || v_row.id;
    END LOOP;

    FOR v_row IN
        SELECT e.id, e.payload, e.payload_checksum
          FROM dead_letter_events e
         WHERE e.id = ANY (v_claimed) AND e.processing_lock = v_lease
         ORDER BY e.priority, e.next_attempt_at, e.id
    LOOP
        v_count := v_count + 1;
        v_ids := v_ids || v_row.id;
        IF NOT v_tripped AND v_probe IS NULL THEN  -- consulted per event: another worker may have opened it
            SELECT b.state = 'open' INTO v_tripped FROM dlq_circuit_breaker_state b
             WHERE b.breaker_name = p_circuit_breaker_name;
        END IF;
        IF v_tripped THEN
            v_outcomes := v_outcomes || 'released'::text;
            v_classes := v_classes || NULL::text;
            v_messages := v_messages || NULL::text;
        ELSIF dlq_payload_checksum(v_row.payload) IS DISTINCT FROM v_row.payload_checksum THEN
            v_outcomes := v_outcomes || 'quarantined'::text;
            v_classes := v_classes || 'checksum_mismatch'::text;
            v_messages := v_messages || 'payload checksum mismatch'::text;
        ELSE
            v_errors := dlq_cowrie_validation_errors(v_row.payload);
            IF cardinality(v_errors) = 0 THEN
                v_outcomes := v_outcomes || 'resolved'::text;
                v_classes := v_classes || NULL::text;
                v_messages := v_messages || NULL::text;
                v_write := v_write || v_row.id;
                v_successes := v_successes + 1;
            ELSE
                v_outcomes := v_outcomes || 'failed'::text;
                v_classes := v_classes || 'invalid_event'::text;
                v_messages := v_messages || array_to_string(v_errors, '; ');
            END IF;
        END IF;
        v_methods := v_methods || CASE WHEN v_outcomes[v_count] = 'resolved' THEN 'replay:sql' END;
        IF p_pause_every > 0 AND v_count % p_pause_every = 0 THEN
            PERFORM pg_sleep(p_pause_seconds);  -- the design's rate limit: a pause every N events
        END IF;
    END LOOP;

    -- Each event at its original position, or at a DLQ-scoped one when it has none (as the worker writes it).
    SELECT coalesce(array_agg(e.id), '{}'), coalesce(array_agg(coalesce(e.source, 'dlq-repair')), '{}'),
           coalesce(array_agg(CASE WHEN e.source IS NULL THEN '' ELSE coalesce(e.source_inode, '') END), '{}'),
           coalesce(array_agg(CASE WHEN e.source IS NULL OR e.source_offset IS NULL THEN e.id ELSE e.source_offset END),
                    '{}')
      INTO v_write, v_sources, v_inodes, v_offsets
      FROM dead_letter_events e
     WHERE e.id = ANY (v_write) AND e.processing_lock = v_lease;
    -- The target's deferred constraint triggers run as the insert ends, before the check below, not at COMMIT
    -- (for the rest of the caller's transaction too: it is the batch's).
    SET CONSTRAINTS ALL IMMEDIATE;
    INSERT INTO raw_events (source, source_inode, source_offset, eventid, session, src_ip, event_timestamp, payload,
                            dlq_event_id, repair_strategy)
    SELECT t.source, t.inode, t.off, e.payload ->> 'eventid', e.payload ->> 'session', (e.payload ->> 'src_ip')::inet,
           (e.payload ->> 'timestamp')::timestamptz, e.payload, e.id, 'replay:sql'
      FROM unnest(v_write, v_sources, v_inodes, v_offsets) AS t(id, source, inode, off)
      JOIN dead_letter_events e ON e.id = t.id
    ON CONFLICT ON CONSTRAINT raw_events_source_position DO NOTHING;
    -- A target that takes the insert and stores no row at a position (a trigger returning NULL, a rule), or holds
    -- another event's row there (two dead letters claiming one position with different contents), would leave the
    -- event resolved with nothing written: such an event fails as a refused write does (target_write_failed, a
    -- failing system for the breaker), and is tried again after its backoff.
    SELECT coalesce(array_agg(t.id), '{}') INTO v_missing
      FROM unnest(v_write, v_sources, v_inodes, v_offsets) AS t(id, source, inode, off)
      JOIN dead_letter_events e ON e.id = t.id
     WHERE NOT EXISTS (SELECT FROM raw_events r
                        WHERE r.source = t.source AND r.source_inode = t.inode AND r.source_offset = t.off
                          AND r.payload = e.payload);
    IF cardinality(v_missing) > 0 THEN
        FOR i IN 1 .. cardinality(v_ids) LOOP
            IF v_ids[i] = ANY (v_missing) THEN
                v_outcomes[i] := 'failed';
                v_methods[i] := NULL;
                v_classes[i] := 'target_write_failed';
                v_messages[i] := 'target write failed: the target holds no row with the event at its position';
            END IF;
        END LOOP;
        v_successes := 0;
    END IF;

    SELECT coalesce(jsonb_object_agg(c.final_state, c.n), '{}') INTO v_states
      FROM (SELECT final_state, count(*) AS n
              FROM dlq_complete_batch(v_lease, v_ids, v_outcomes, v_methods, v_classes, v_messages)
             GROUP BY final_state) c;

    -- Invalid payloads are data faults, not a failing system: they reset nothing and count nothing here. A target
    -- that refuses a write with an error aborts the whole batch (this transaction: nothing is claimed or charged);
    -- one that keeps no row with an event counts that event as a failure.
    PERFORM dlq_breaker_record(p_circuit_breaker_name, v_successes, cardinality(v_missing), v_probe);
    processed := cardinality(v_ids) - coalesce((v_states ->> 'released')::integer, 0);
    repaired := coalesce((v_states ->> 'resolved')::integer, 0);
    poisoned := coalesce((v_states ->> 'poisoned')::integer, 0);
    failed := coalesce((v_states ->> 'retry_scheduled')::integer, 0) + poisoned;
    skipped := coalesce((v_states ->> 'released')::integer, 0);
    quarantined := coalesce((v_states ->> 'quarantined')::integer, 0);
    circuit_breaker_triggered := v_tripped;
    duration_ms := (extract(epoch FROM clock_timestamp() - v_started) * 1000)::integer;
    INSERT INTO dlq_processing_metrics (processing_session_id, processing_method, batch_size, processed_count,
        repaired_count, failed_count, skipped_count, quarantined_count, poisoned_count, processing_duration_ms,
        avg_processing_time_ms, circuit_breaker_name, circuit_breaker_triggered, started_at, completed_at)
    VALUES (v_session, 'stored_procedure', cardinality(v_ids), processed, repaired, failed, skipped, quarantined,
            poisoned, duration_ms, CASE WHEN processed > 0 THEN round(duration_ms::numeric / processed, 3) END,
            p_circuit_breaker_name, v_tripped, v_started, clock_timestamp());
    RETURN NEXT;
END
$$;

COMMENT ON FUNCTION process_dlq_events_enhanced(p_limit integer, p_reason_filter text, p_priority_filter integer, p_circuit_breaker_name text, p_pause_every integer, p_pause_seconds double precision) IS 'Process one batch of dead letters that need no repair entirely in the database; returns the batch''s counts.';
