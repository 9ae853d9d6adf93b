-- Claims and leases: the first half of the state machine every client shares.
-- claim -> heartbeat* -> complete (sql/functions/50_completion.sql). Two kinds of lease, one set of rules:
--
-- * Committed lease (dlq_claim_events, dlq_heartbeat, dlq_release_stale_leases): the lease is written to the
--   rows and committed before any work, visible to other sessions, and expires if its holder dies. Two writes
--   per event; for clients that hold events across transactions (and the in-database path).
-- * Transaction lease (dlq_claim_batch, dlq_journal_batch, dlq_forget_batch, dlq_release_dead_batches): the
--   batch is claimed FOR UPDATE SKIP LOCKED inside the transaction that completes it, and the row locks are the
--   lease: one write per event, fenced by the locks, lost at once with the holder's transaction. A journal
--   (dlq_batch_leases), written from a second session, and an advisory lock keyed by the lease (dlq_lease_take,
--   which also records the lease for the holder's own tests, dlq_lease_mine) keep what a committed lease
--   gives: an entry whose advisory lock nobody holds belongs to a holder that died, and its events are counted
--   one failed attempt (lease_expired) each, as for an expired committed lease, so an event that kills its
--   worker every time is poisoned after the cap instead of looping. The Python worker's default. One batch per
--   transaction, READ COMMITTED (the completion reads the journal committed after the claim).
--
--   Protocol (dlq_assets/core/processing/):
--     session B: SELECT dlq_release_dead_batches();                   -- before each claim; commits on its own
--     session A: BEGIN; SELECT * FROM dlq_claim_batch(lease, n, ...);
--     session B: SELECT dlq_journal_batch(lease, ids, worker);        -- commits on its own
--     session A: ... dlq_claim_fragment_chains(lease, ...) (then journal those too), target writes,
--                dlq_complete_batch(lease, ...); COMMIT.

-- The advisory lock key of a lease: its first 64 bits.
CREATE OR REPLACE FUNCTION dlq_lease_key(p_lease uuid) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT ('x' || translate(left(p_lease::text, 18), '-', ''))::bit(64)::bigint $$;

-- The backend holding a lease's advisory lock, 0 for a prepared transaction (it has none), or NULL: its holder is
-- gone, or the lease was never claimed.
CREATE OR REPLACE FUNCTION dlq_lease_holder(p_lease uuid) RETURNS integer
    LANGUAGE sql STABLE STRICT SET search_path = public, pg_temp
AS $$
    SELECT coalesce(l.pid, 0) FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.classid::bigint = (dlq_lease_key(p_lease) >> 32) & 4294967295
       AND l.objid::bigint = dlq_lease_key(p_lease) & 4294967295
     LIMIT 1
$$;

-- Whether this transaction holds the lease: dlq_lease_take records "<transaction id>:<lease>" in a
-- transaction-local setting, which ends with the transaction, or with a savepoint rolled back, as the lease's
-- lock does, and names the transaction, so a value left or set in the session outside it counts for nothing.
-- The holder's own test without reading pg_locks (0.16-0.42 ms a read, every lock of every session; several a
-- batch). Not a defence against a forger, who can take the lease's advisory lock by hand as well.
CREATE OR REPLACE FUNCTION dlq_lease_mine(p_lease uuid) RETURNS boolean
    LANGUAGE sql VOLATILE STRICT
AS $$
    SELECT position(' ' || pg_current_xact_id() || ':' || p_lease IN coalesce(current_setting('dlq.leases', true), '')) > 0
$$;

-- Whether this transaction holds any lease (a batch transaction).
CREATE OR REPLACE FUNCTION dlq_lease_any_mine() RETURNS boolean
    LANGUAGE sql VOLATILE
AS $$ SELECT position(' ' || pg_current_xact_id() || ':' IN coalesce(current_setting('dlq.leases', true), '')) > 0 $$;

-- Take a lease for this transaction: its advisory lock, and the record dlq_lease_mine reads. False when another
-- session holds it.
CREATE OR REPLACE FUNCTION dlq_lease_take(p_lease uuid) RETURNS boolean
    LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(dlq_lease_key(p_lease)) THEN
        RETURN false;
    END IF;
    PERFORM set_config('dlq.leases',
                       coalesce(current_setting('dlq.leases', true), '') || ' ' || pg_current_xact_id() || ':' || p_lease,
                       true);
    RETURN true;
END
$$;

-- The arguments every claim checks, one rule each, as WorkerConfig checks them: a lease of one second to a day
-- (longer, a dead holder's events would wait that long), counted from the moment it is taken (clock_timestamp(),
-- not its transaction's start: taken in a transaction open longer than the lease, it would have expired at once);
-- a priority ceiling of 1 to 10 or none (0 or 11 would claim nothing, or everything, without a word).
CREATE OR REPLACE FUNCTION dlq_check_lease_seconds(p_lease_seconds integer) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 86400 THEN
        RAISE EXCEPTION 'p_lease_seconds must be between 1 and 86400, got %', coalesce(p_lease_seconds::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION dlq_check_priority_max(p_priority_max integer) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_priority_max NOT BETWEEN 1 AND 10 THEN
        RAISE EXCEPTION 'p_priority_max must be between 1 and 10 (or NULL for all), got %', p_priority_max
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Claims exclude malicious rows themselves. Row security hides them from dlq_processor_role, but the table
-- owner (who runs the worker on the embedded server, or with the owner's URL) bypasses row security, and their
-- payloads would reach raw_events, which dlq_reader reads. security_admin releases one after review
-- (dlq_release_reviewed below).
--
-- Order: priority, then the time an event became due (next_attempt_at: its insert, or the end of its backoff),
-- then id. One range of ix_dead_letter_events_due per priority (1 to 10, the CHECK's range), taken in turn until
-- the batch is full: events waiting out a backoff lie past each range and are never read, on any PostgreSQL
-- version (a single scan ordered by priority walks the waiting entries of every priority before the one it
-- fills the batch from). dlq_due_events_sql makes that choice, once, for every claim.

-- The due events a claim takes, as the text of a query to EXECUTE (planned with the real limit each time) with $1 =
-- the highest priority number to take (NULL: all), $2 = a reason (NULL: any), $3 = the limit; the caller's own
-- parameters follow from $4. p_columns: what the query returns of each row ("c"); p_free: the lease's rule for a
-- row free to claim. Malicious rows are never taken (nor in the index).
CREATE OR REPLACE FUNCTION dlq_due_events_sql(p_columns text, p_free text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT format($q$
        SELECT %1$s FROM generate_series(1, least(coalesce($1::integer, 10), 10)) AS p(priority)
         CROSS JOIN LATERAL (
               SELECT %1$s FROM dead_letter_events c
                WHERE c.priority = p.priority AND NOT c.resolved AND c.quarantined_at IS NULL
                  AND c.next_attempt_at <= now() AND c.classification IS DISTINCT FROM 'malicious'
                  AND (%2$s) AND ($2::text IS NULL OR c.reason = $2)
                ORDER BY c.next_attempt_at, c.id
                LIMIT $3
                  FOR UPDATE SKIP LOCKED) c
         LIMIT $3$q$, p_columns, p_free)
$$;

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
    PERFORM dlq_check_lease_seconds(p_lease_seconds);
    PERFORM dlq_check_priority_max(p_priority_max);
    IF EXISTS (SELECT 1 FROM dead_letter_events
                WHERE processing_lock IS NOT NULL AND lock_expires_at <= now() AND NOT resolved) THEN
        PERFORM dlq_release_stale_leases();
    END IF;
    RETURN QUERY EXECUTE format(
        'UPDATE dead_letter_events e
            SET processing_lock = $4,
                lock_expires_at = clock_timestamp() + make_interval(secs => $5),
                last_processed_at = now(),
                processing_attempts = e.processing_attempts || jsonb_build_array(jsonb_build_object(
                    ''lease'', $4, ''claimed_at'', now(), ''worker'', $6, ''attempt'', e.retry_count + 1))
          WHERE e.id = ANY (ARRAY(%s))
            AND NOT e.resolved AND e.quarantined_at IS NULL
            AND (e.processing_lock IS NULL OR e.lock_expires_at <= now())
            AND e.classification IS DISTINCT FROM ''malicious''
        RETURNING e.*',
        dlq_due_events_sql('c.id', 'c.processing_lock IS NULL OR c.lock_expires_at <= now()'))
    USING p_priority_max, p_reason, p_limit, v_lease, p_lease_seconds, p_worker;
END
$$;

COMMENT ON FUNCTION dlq_claim_events(p_limit integer, p_lease_seconds integer, p_priority_max integer, p_reason text, p_worker text) IS 'Claim up to p_limit claimable dead letters under one fresh lease (processing_lock); returns the claimed rows.';

-- Extend a live lease; returns how many events it still holds (0: the lease was lost).
CREATE OR REPLACE FUNCTION dlq_heartbeat(p_lease uuid, p_lease_seconds integer DEFAULT 1800) RETURNS integer
    LANGUAGE sql SET search_path = public, pg_temp
AS $$
    SELECT dlq_check_lease_seconds(p_lease_seconds);
    WITH extended AS (
        UPDATE dead_letter_events
           SET lock_expires_at = clock_timestamp() + make_interval(secs => p_lease_seconds)
         WHERE processing_lock = p_lease AND NOT resolved
        RETURNING 1)
    SELECT count(*)::integer FROM extended
$$;

-- Give back expired leases: each counts as a failed attempt (lease_expired), so a worker-killing event is
-- poisoned after the cap instead of looping. Returns how many leases were released.
CREATE OR REPLACE FUNCTION dlq_release_stale_leases() RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_lease   uuid;
    v_ids     bigint[];
    v_total   integer := 0;
BEGIN
    -- One releaser at a time: two taking the same expired leases in different orders would deadlock, and the second
    -- would count what the first released. The others skip: the leases are being released.
    IF NOT pg_try_advisory_xact_lock(hashtext('dlq_release_stale_leases')) THEN
        RETURN 0;
    END IF;
    FOR v_lease, v_ids IN
        SELECT processing_lock, array_agg(id ORDER BY id)
          FROM dead_letter_events
         WHERE processing_lock IS NOT NULL AND lock_expires_at <= now() AND NOT resolved
         GROUP BY processing_lock
         ORDER BY processing_lock
    LOOP
        v_total := v_total + (
            SELECT count(*) FROM dlq_complete_batch(
                v_lease, v_ids, array_fill('failed'::text, ARRAY[cardinality(v_ids)]), NULL,
                array_fill('lease_expired'::text, ARRAY[cardinality(v_ids)]),
                array_fill('the lease expired before the batch completed'::text, ARRAY[cardinality(v_ids)])) c
             WHERE c.final_state <> 'not_owned');  -- a row taken meanwhile by a claim is that claim's
    END LOOP;
    RETURN v_total;
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
    PERFORM dlq_check_priority_max(p_priority_max);
    -- A random (version 4) lease: its lock key is its first 64 bits, which time-ordered UUIDs made together share.
    IF substr(p_lease::text, 15, 1) <> '4' OR substr(p_lease::text, 20, 1) NOT IN ('8', '9', 'a', 'b') THEN
        RAISE EXCEPTION 'a lease must be a random (version 4) UUID, got %', p_lease USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One batch per transaction: a second claim would take this transaction's own locked rows again (SKIP LOCKED
    -- skips other sessions' locks only), and a death would charge them once per lease.
    IF dlq_lease_any_mine() THEN
        RAISE EXCEPTION 'this transaction holds a batch already: claim one batch per transaction'
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    -- The journal, committed from another session after the claim, must be visible to the completion: a snapshot
    -- taken for the whole transaction (REPEATABLE READ, SERIALIZABLE) would never see it.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'a batch is claimed in a READ COMMITTED transaction, not %', current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    IF NOT dlq_lease_take(p_lease) THEN
        RAISE EXCEPTION 'lease % is held by another session', p_lease USING ERRCODE = 'lock_not_available';
    END IF;
    RETURN QUERY EXECUTE dlq_due_events_sql('c.*', 'c.processing_lock IS NULL') USING p_priority_max, p_reason, p_limit;
END
$$;

-- Journal a batch's events under its lease; call from a session other than the batch's, so it commits at once.
CREATE OR REPLACE FUNCTION dlq_journal_batch(p_lease uuid, p_ids bigint[], p_worker text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
BEGIN
    IF p_lease IS NULL THEN
        RAISE EXCEPTION 'a lease is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- From the batch's own transaction the entry would die with it, and a crash would go uncounted.
    IF dlq_lease_mine(p_lease) THEN
        RAISE EXCEPTION 'journal lease % from another session than the one that claimed it', p_lease
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    -- Held by another session when a shared lock on it is refused (taken, it is released with this statement's
    -- error); one test of the lease's lock instead of a read of every lock (pg_locks).
    IF pg_try_advisory_xact_lock_shared(dlq_lease_key(p_lease)) THEN
        RAISE EXCEPTION 'lease % is not held: claim with dlq_claim_batch inside a transaction, then journal from '
                        'another session', p_lease USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_ids) > 0 THEN
        INSERT INTO dlq_batch_leases (lease, event_ids, worker) VALUES (p_lease, p_ids, left(p_worker, 200));
    END IF;
END
$$;

-- A batch whose transaction a worker rolled back because of an infrastructure failure: its journal entry goes
-- without charging its events an attempt (dlq_release_dead_batches charges a batch whose holder died, since
-- that holder may have been killed by one of its events). The lease's lock is waited for (10 s at most): the
-- session that held it may still be ending; once it has the lock, no transaction holds the batch.
CREATE OR REPLACE FUNCTION dlq_forget_batch(p_lease uuid) RETURNS integer
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

-- Give back the events of batches whose holder died: one failed attempt (lease_expired) each, as for an
-- expired committed lease; expired committed leases too. Events another transaction holds are left to it.
-- Call it outside any batch transaction. Returns how many events were counted.
CREATE OR REPLACE FUNCTION dlq_release_dead_batches() RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_lease uuid;
    v_ids   bigint[];
    v_total integer := 0;
BEGIN
    IF dlq_lease_any_mine() THEN  -- its own locked rows are not skipped: they would be charged with the dead ones
        RAISE EXCEPTION 'release dead batches outside a batch transaction' USING ERRCODE = 'invalid_transaction_state';
    END IF;
    FOR v_lease IN SELECT DISTINCT lease FROM dlq_batch_leases LOOP
        -- Alive: its holder has the lock (this session included). Dead: the lock is ours until we commit.
        CONTINUE WHEN dlq_lease_mine(v_lease) OR NOT dlq_lease_take(v_lease);
        SELECT array_agg(e.id) INTO v_ids FROM (
            SELECT e.id FROM dead_letter_events e  -- by primary key, as in dlq_claim_fragment_chains
             WHERE e.id = ANY (ARRAY(SELECT unnest(b.event_ids) FROM dlq_batch_leases b WHERE b.lease = v_lease))
               AND e.resolved IS NOT TRUE AND e.quarantined_at IS NULL AND e.processing_lock IS NULL
               FOR UPDATE SKIP LOCKED) e;
        IF v_ids IS NOT NULL THEN
            PERFORM dlq_complete_batch(v_lease, v_ids, array_fill('failed'::text, ARRAY[cardinality(v_ids)]),
                                       NULL, array_fill('lease_expired'::text, ARRAY[cardinality(v_ids)]),
                                       array_fill('the batch''s transaction ended before it completed'::text,
                                                  ARRAY[cardinality(v_ids)]));
            v_total := v_total + cardinality(v_ids);
        END IF;
        DELETE FROM dlq_batch_leases WHERE lease = v_lease;
    END LOOP;
    IF EXISTS (SELECT 1 FROM dead_letter_events
                WHERE processing_lock IS NOT NULL AND lock_expires_at <= now() AND NOT resolved) THEN
        v_total := v_total + dlq_release_stale_leases();
    END IF;
    RETURN v_total;
END
$$;

-- PL/pgSQL, not SQL: PostgreSQL before 18 plans a SQL function's statements at every call (6.7 ms a call on
-- PostgreSQL 15 against 4.7 here, a batch's seeds on the benchmark's backlog); PL/pgSQL keeps its plan for the
-- session, and PostgreSQL 18 takes the same time either way (4.3 ms).
CREATE OR REPLACE FUNCTION dlq_claim_fragment_chains(
    p_lease         uuid,
    p_ids           bigint[],
    p_window_bytes  bigint,
    p_lease_seconds integer DEFAULT 1800
) RETURNS SETOF dead_letter_events
    LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM dlq_check_lease_seconds(p_lease_seconds);
    IF p_window_bytes IS NULL OR p_window_bytes NOT BETWEEN 0 AND 1073741824 THEN
        RAISE EXCEPTION 'p_window_bytes must be between 0 and 1073741824, got %', coalesce(p_window_bytes::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY WITH RECURSIVE held AS (
        SELECT dlq_lease_mine(p_lease) AS by_transaction
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
           AND e.source_offset BETWEEN 0 AND 4611686018427387903  -- 2^62: no file is that long, and the window's
           AND dlq_record_bytes(e.metadata_json) IS NOT NULL   -- bounds stay in bigint (a forged offset: no seed)
        UNION
        SELECT n.id, n.source, n.source_inode, n.source_offset,
               n.source_offset + dlq_record_bytes(n.metadata_json), c.min_lo, c.max_hi
          FROM chain c
         CROSS JOIN LATERAL (
               (SELECT d.* FROM dead_letter_events d  -- the record right after: 1 or 2 bytes after this one ends
                 WHERE d.source = c.source AND d.source_inode IS NOT DISTINCT FROM c.inode  -- a range, not IN:
                   AND d.source_offset BETWEEN c.hi + 1 AND c.hi + 2  -- PostgreSQL 15 scanned the source for IN
                   AND d.source_offset <= c.max_hi AND NOT d.resolved  -- ix_dead_letter_events_source_offset
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
           lock_expires_at = clock_timestamp() + make_interval(secs => p_lease_seconds),
           last_processed_at = now(),
           processing_attempts = e.processing_attempts || jsonb_build_array(jsonb_build_object(
               'lease', p_lease, 'claimed_at', now(), 'attempt', e.retry_count + 1, 'as', 'neighbour'))
     WHERE e.id = ANY (ARRAY(
           SELECT c.id FROM dead_letter_events c  -- by primary key: the ids first, as an array; and
            WHERE c.id = ANY (ARRAY(SELECT id FROM chain EXCEPT SELECT m.id FROM mine m))
              AND c.resolved IS NOT TRUE  -- not "NOT resolved", which let PostgreSQL 15 pick the whole
              AND c.quarantined_at IS NULL  -- partial claim index instead (210 ms a call at 30k rows)
              AND c.classification IS DISTINCT FROM 'malicious'
              AND (c.processing_lock IS NULL OR c.lock_expires_at <= now())
              FOR UPDATE SKIP LOCKED))
    RETURNING e.*;
END
$$;

COMMENT ON FUNCTION dlq_claim_fragment_chains(p_lease uuid, p_ids bigint[], p_window_bytes bigint, p_lease_seconds integer) IS 'Add to a live lease the free dead letters contiguous with its events p_ids (within p_window_bytes).';

-- security_admin's release of a malicious dead letter after review: classified 'reviewed' (visible and
-- claimable again, due at once), the decision recorded in its error history with who and why.
CREATE OR REPLACE FUNCTION dlq_release_reviewed(p_id bigint, p_note text) RETURNS dead_letter_events
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
