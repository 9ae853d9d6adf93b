-- 0021: malicious rows never claimed by any caller; the breaker configured only by security_admin; an
-- infrastructure failure opens it and costs no event an attempt; raw_events flags duplicate keys.

-- Claims exclude malicious rows themselves. Row security hides them from dlq_processor_role, but the table
-- owner (who runs the worker on the embedded server, or with the owner's URL) bypasses row security, and their
-- payloads would reach raw_events, which dlq_reader reads. security_admin releases one after review
-- (dlq_release_reviewed below).
CREATE OR REPLACE FUNCTION dlq_claim_events(
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
                   AND c.classification IS DISTINCT FROM ''malicious''
                   AND ($3::integer IS NULL OR c.priority <= $3)
                   AND ($4::text IS NULL OR c.reason = $4)
                 ORDER BY c.priority, c.created_at, c.id
                 LIMIT $6
                   FOR UPDATE SKIP LOCKED))
            AND NOT e.resolved AND e.quarantined_at IS NULL
            AND (e.processing_lock IS NULL OR e.lock_expires_at <= now())
            AND e.classification IS DISTINCT FROM ''malicious''
        RETURNING e.*'
    USING v_lease, p_lease_seconds, p_priority_max, p_reason, p_worker, p_limit;
END
$$;

CREATE OR REPLACE FUNCTION dlq_claim_batch(
    p_lease         uuid,
    p_limit         integer,
    p_priority_max  integer DEFAULT NULL,
    p_reason        text DEFAULT NULL
) RETURNS SETOF dead_letter_events
    LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
BEGIN
    IF p_lease IS NULL THEN
        RAISE EXCEPTION 'a lease is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 100000 THEN
        RAISE EXCEPTION 'p_limit must be between 1 and 100000, got %', p_limit USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT pg_try_advisory_xact_lock(dlq_lease_key(p_lease)) THEN
        RAISE EXCEPTION 'lease % is held by another session', p_lease USING ERRCODE = 'lock_not_available';
    END IF;
    RETURN QUERY EXECUTE  -- planned with the real LIMIT each time (see dlq_claim_events)
        'SELECT c.* FROM dead_letter_events c
          WHERE NOT c.resolved AND c.quarantined_at IS NULL AND c.next_attempt_at <= now()
            AND c.processing_lock IS NULL
            AND c.classification IS DISTINCT FROM ''malicious''
            AND ($1::integer IS NULL OR c.priority <= $1)
            AND ($2::text IS NULL OR c.reason = $2)
          ORDER BY c.priority, c.created_at, c.id
          LIMIT $3
            FOR UPDATE SKIP LOCKED'
    USING p_priority_max, p_reason, p_limit;
END
$$;

-- A dead letter's record length, or NULL when its metadata holds none a byte count can be: a processor writes
-- metadata_json, so 1e30, 12.5 or text must not break the claims that read it (they skip such a row instead).
CREATE FUNCTION dlq_record_bytes(p_metadata jsonb) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN (p_metadata ->> 'record_bytes') ~ '^[0-9]{1,15}$' THEN (p_metadata ->> 'record_bytes')::bigint END
$$;

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
               e.source_offset + dlq_record_bytes(e.metadata_json),
               e.source_offset - p_window_bytes,
               e.source_offset + dlq_record_bytes(e.metadata_json) + p_window_bytes
          FROM dead_letter_events e
         WHERE e.id = ANY (p_ids) AND e.source IS NOT NULL
           AND (e.processing_lock = p_lease
                OR (e.processing_lock IS NULL AND e.id = ANY (ARRAY(SELECT m.id FROM mine m))))
           AND e.source_offset IS NOT NULL AND dlq_record_bytes(e.metadata_json) IS NOT NULL
        UNION
        SELECT n.id, n.source, n.source_inode, n.source_offset,
               n.source_offset + dlq_record_bytes(n.metadata_json), c.min_lo, c.max_hi
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
                OR n.source_offset + dlq_record_bytes(n.metadata_json) + 1 IN (c.lo, c.lo - 1))
           AND dlq_record_bytes(n.metadata_json) IS NOT NULL
           AND NOT n.resolved AND n.quarantined_at IS NULL
           AND n.classification IS DISTINCT FROM 'malicious'  -- a chain never runs through one
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
              AND c.classification IS DISTINCT FROM 'malicious'
              AND (c.processing_lock IS NULL OR c.lock_expires_at <= now())
              FOR UPDATE SKIP LOCKED))
    RETURNING e.*
$$;

-- security_admin's release of a malicious dead letter after review: classified 'reviewed' (visible and
-- claimable again, due at once), the decision recorded in its error history with who and why.
CREATE FUNCTION dlq_release_reviewed(p_id bigint, p_note text) RETURNS dead_letter_events
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dead_letter_events;
BEGIN
    IF p_note IS NULL OR length(btrim(p_note)) = 0 OR length(p_note) > 1000 THEN
        RAISE EXCEPTION 'a review note of 1 to 1000 characters is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE dead_letter_events
       SET classification = 'reviewed', next_attempt_at = now(), updated_at = now(),
           error_history = error_history || jsonb_build_array(jsonb_build_object(
               'at', now(), 'released_by', session_user, 'as', current_setting('role'), 'note', p_note,
               'was', 'malicious'))
     WHERE id = p_id AND classification = 'malicious' AND NOT resolved
    RETURNING * INTO v_row;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no unresolved malicious dead letter with id %', p_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_row;
END
$$;
REVOKE EXECUTE ON FUNCTION dlq_release_reviewed(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_release_reviewed(bigint, text) TO security_admin;

-- The breaker. Processors record outcomes through the functions; they neither write its row nor configure it.
REVOKE INSERT, UPDATE, DELETE ON dlq_circuit_breaker_state FROM dlq_processor_role;
REVOKE USAGE ON SEQUENCE dlq_circuit_breaker_state_id_seq FROM dlq_processor_role;

-- Rows outside the bounds below are brought within them first, so the constraint holds in every database.
UPDATE dlq_circuit_breaker_state
   SET failure_threshold = least(greatest(failure_threshold, 1), 10000),
       timeout_seconds = least(greatest(timeout_seconds, 1), 3600),
       failure_count = least(failure_count, 1000000),
       next_attempt_time = least(next_attempt_time, now() + interval '3600 s')
 WHERE failure_threshold > 10000 OR timeout_seconds NOT BETWEEN 1 AND 3600 OR failure_count > 1000000
    OR next_attempt_time > now() + interval '3600 s';
ALTER TABLE dlq_circuit_breaker_state ADD CONSTRAINT dlq_circuit_breaker_bounds
    CHECK (failure_threshold BETWEEN 1 AND 10000 AND timeout_seconds BETWEEN 1 AND 3600
           AND failure_count <= 1000000);

-- Names are short printable ASCII: they reach terminals, logs and the Dagster UI.
CREATE FUNCTION dlq_breaker_check_name(p_name text) RETURNS void
    LANGUAGE plpgsql IMMUTABLE SET search_path = public, pg_temp
AS $$
BEGIN
    IF p_name IS NULL OR p_name !~ '^[!-~]([ -~]{0,62}[!-~])?$' THEN
        RAISE EXCEPTION 'a breaker name is 1 to 64 printable ASCII characters, got %', quote_literal(left(p_name, 80))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Creating a breaker with defaults is every processor's; setting its threshold or timeout is security_admin's
-- (dlq_breaker_configure). The bounds keep an hour-long timeout the longest wait a setting can cause.
CREATE OR REPLACE FUNCTION dlq_breaker_ensure(p_name text, p_threshold integer DEFAULT NULL,
                                              p_timeout_seconds integer DEFAULT NULL)
    RETURNS dlq_circuit_breaker_state
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    PERFORM dlq_breaker_check_name(p_name);
    IF p_threshold IS NOT NULL OR p_timeout_seconds IS NOT NULL THEN
        RAISE EXCEPTION 'dlq_breaker_ensure creates a breaker with its defaults; configure it with dlq_breaker_configure'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO dlq_circuit_breaker_state (breaker_name) VALUES (p_name) ON CONFLICT (breaker_name) DO NOTHING;
    SELECT * INTO v_row FROM dlq_circuit_breaker_state WHERE breaker_name = p_name;
    RETURN v_row;
END
$$;

CREATE FUNCTION dlq_breaker_configure(p_name text, p_threshold integer DEFAULT NULL,
                                      p_timeout_seconds integer DEFAULT NULL)
    RETURNS dlq_circuit_breaker_state
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    PERFORM dlq_breaker_check_name(p_name);
    IF p_threshold IS NOT NULL AND p_threshold NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'failure threshold must be between 1 and 10000, got %', p_threshold
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_timeout_seconds IS NOT NULL AND p_timeout_seconds NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'timeout must be between 1 and 3600 seconds, got %', p_timeout_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO dlq_circuit_breaker_state (breaker_name, failure_threshold, timeout_seconds)
    VALUES (p_name, coalesce(p_threshold, 5), coalesce(p_timeout_seconds, 60))
    ON CONFLICT (breaker_name) DO UPDATE
        SET failure_threshold = coalesce(p_threshold, dlq_circuit_breaker_state.failure_threshold),
            timeout_seconds = coalesce(p_timeout_seconds, dlq_circuit_breaker_state.timeout_seconds),
            updated_at = now()
    RETURNING * INTO v_row;
    RETURN v_row;
END
$$;

-- Outcome counts are a batch's: at most the largest claim (100000) each.
CREATE OR REPLACE FUNCTION dlq_breaker_record(p_name text, p_successes integer, p_failures integer,
                                              p_probe uuid DEFAULT NULL)
    RETURNS dlq_circuit_breaker_state
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    IF p_successes NOT BETWEEN 0 AND 100000 OR p_failures NOT BETWEEN 0 AND 100000 THEN
        RAISE EXCEPTION 'outcome counts must be between 0 and 100000, got % and %', p_successes, p_failures
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_row FROM dlq_circuit_breaker_state WHERE breaker_name = p_name;
    IF NOT FOUND THEN
        v_row := dlq_breaker_ensure(p_name);
    END IF;
    IF v_row.state = 'closed' AND p_failures = 0 AND v_row.failure_count = 0 THEN
        RETURN v_row;  -- the common case changes nothing: take no row lock
    END IF;
    SELECT * INTO v_row FROM dlq_circuit_breaker_state WHERE breaker_name = p_name FOR UPDATE;
    IF v_row.state = 'half_open' THEN
        IF p_probe IS NULL OR p_probe IS DISTINCT FROM v_row.half_open_probe THEN
            RETURN v_row;  -- not the probe: its result does not decide (it should not have run)
        END IF;
        IF p_failures > 0 THEN
            UPDATE dlq_circuit_breaker_state
               SET state = 'open', failure_count = least(failure_count + p_failures, 1000000),
                   last_failure_time = now(), opened_at = now(),
                   next_attempt_time = now() + make_interval(secs => timeout_seconds),
                   half_open_probe = NULL, updated_at = now()
             WHERE breaker_name = p_name RETURNING * INTO v_row;
        ELSE
            UPDATE dlq_circuit_breaker_state
               SET state = 'closed', failure_count = 0, next_attempt_time = NULL, half_open_probe = NULL,
                   opened_at = NULL, updated_at = now()
             WHERE breaker_name = p_name RETURNING * INTO v_row;
        END IF;
        RETURN v_row;
    END IF;
    IF v_row.state = 'open' THEN
        RETURN v_row;  -- late reports from work started before it opened change nothing
    END IF;
    UPDATE dlq_circuit_breaker_state
       SET failure_count = CASE WHEN p_successes > 0 THEN p_failures
                                ELSE least(failure_count + p_failures, 1000000) END,
           last_failure_time = CASE WHEN p_failures > 0 THEN now() ELSE last_failure_time END,
           updated_at = now()
     WHERE breaker_name = p_name RETURNING * INTO v_row;
    IF v_row.failure_count >= v_row.failure_threshold THEN
        UPDATE dlq_circuit_breaker_state
           SET state = 'open', opened_at = now(), next_attempt_time = now() + make_interval(secs => timeout_seconds),
               updated_at = now()
         WHERE breaker_name = p_name RETURNING * INTO v_row;
    END IF;
    RETURN v_row;
END
$$;

-- An infrastructure failure (the target refused a write, the connection or the disk failed, a timeout): the
-- breaker opens at once, whatever its count, for its timeout. A half-open probe that met one opens it too.
-- Already open, it stays as it is: the timeout is not extended by every worker that meets the same failure.
-- Only a breaker that exists (a worker ensures its own before it claims): no open breaker under a made-up name.
CREATE FUNCTION dlq_breaker_trip(p_name text, p_probe uuid DEFAULT NULL) RETURNS dlq_circuit_breaker_state
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    UPDATE dlq_circuit_breaker_state
       SET state = 'open', failure_count = greatest(failure_count, failure_threshold), last_failure_time = now(),
           opened_at = now(), next_attempt_time = now() + make_interval(secs => timeout_seconds),
           half_open_probe = NULL, updated_at = now()
     WHERE breaker_name = p_name
       AND (state = 'closed' OR (state = 'half_open' AND p_probe IS NOT DISTINCT FROM half_open_probe))
    RETURNING * INTO v_row;
    IF NOT FOUND THEN
        SELECT * INTO v_row FROM dlq_circuit_breaker_state WHERE breaker_name = p_name;
    END IF;
    RETURN v_row;
END
$$;

-- A batch whose transaction a worker rolled back because of an infrastructure failure: its journal entry goes
-- without charging its events an attempt (dlq_release_dead_batches charges a batch whose holder died, since
-- that holder may have been killed by one of its events). The lease's lock is waited for (10 s at most): the
-- session that held it may still be ending; once it has the lock, no transaction holds the batch.
CREATE FUNCTION dlq_forget_batch(p_lease uuid) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM set_config('lock_timeout', '10s', true);
    PERFORM pg_advisory_xact_lock(dlq_lease_key(p_lease));
    DELETE FROM dlq_batch_leases WHERE lease = p_lease;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

REVOKE EXECUTE ON FUNCTION dlq_breaker_configure(text, integer, integer), dlq_breaker_trip(text, uuid),
    dlq_forget_batch(uuid), dlq_breaker_check_name(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_breaker_trip(text, uuid), dlq_forget_batch(uuid) TO dlq_processor_role;
GRANT EXECUTE ON FUNCTION dlq_breaker_configure(text, integer, integer) TO security_admin;
GRANT EXECUTE ON FUNCTION dlq_breaker_ensure(text, integer, integer) TO security_admin;

-- Duplicate keys: jsonb keeps the last of them, so a record that had any keeps its exact text in original_text
-- and is flagged here; the partial index finds the few flagged rows cheaply.
ALTER TABLE raw_events ADD COLUMN duplicate_keys boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN raw_events.duplicate_keys IS
    'True when the record held a key twice in one object: payload keeps the last value (as jsonb does), '
    'original_text the record as written.';
CREATE INDEX ix_raw_events_duplicate_keys ON raw_events (event_timestamp) WHERE duplicate_keys;

-- A timestamp PostgreSQL cannot store is not a Cowrie timestamp: offsets past 15:59 (timestamptz's limit; the
-- Python validator agrees, dlq_assets/cowrie.py), which would otherwise fail the target write of a whole batch.
CREATE OR REPLACE FUNCTION dlq_is_cowrie_timestamp(p_value jsonb) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE SET search_path = public, pg_temp
AS $$
DECLARE
    v_parts text[];
BEGIN
    IF jsonb_typeof(p_value) IS DISTINCT FROM 'string' THEN
        RETURN false;
    END IF;
    v_parts := regexp_match(p_value #>> '{}',
        '^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,6})?(Z|[+-]([0-9]{2}):?([0-9]{2}))$');
    IF v_parts IS NULL OR v_parts[4]::int > 23 OR v_parts[6]::int > 59  -- PostgreSQL takes 24:00 and :60
       OR (v_parts[9] IS NOT NULL AND (v_parts[9]::int > 15 OR v_parts[10]::int > 59)) THEN
        RETURN false;
    END IF;
    PERFORM make_timestamp(v_parts[1]::int, v_parts[2]::int, v_parts[3]::int, v_parts[4]::int, v_parts[5]::int,
                           v_parts[6]::double precision);
    RETURN true;
EXCEPTION WHEN datetime_field_overflow THEN
    RETURN false;  -- month 13, day 31 of a 30-day month, hour 24, ...: not a timestamp
END
$$;
