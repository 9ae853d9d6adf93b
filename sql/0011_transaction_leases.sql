-- 0011: transaction leases, the Python worker's fast path (measured in benchmarks/README.md).
--
-- A committed lease writes every claimed row twice (lease, then outcome) and commits twice per batch; the SQL of
-- that alone ran at 0.38 of the claim-and-resolve ceiling. A transaction lease writes each row once: the batch
-- is claimed with FOR UPDATE SKIP LOCKED inside the transaction that completes it, and the row locks are the
-- lease (0.7 of the ceiling). Fencing comes with the locks: nobody else can claim, complete or reclassify a
-- locked row, and a holder that dies or is cut off loses its locks with its transaction, at once, instead of
-- after an expiry.
--
-- What a committed lease also gave is kept by a small journal, dlq_batch_leases: right after claiming, the
-- worker records the batch's ids under its lease from a second session (so the record commits while the batch
-- transaction runs), and holds an advisory lock keyed by the lease in the batch transaction. A journal entry
-- whose advisory lock nobody holds belongs to a holder that died: dlq_release_dead_batches counts one failed
-- attempt (lease_expired) for each of its events, exactly as for an expired committed lease, so an event that
-- kills its worker every time is poisoned after the cap instead of looping. The release runs in a session of
-- its own, never in a batch transaction: a batch that dies would take the count down with it. Completion
-- deletes the entry in the batch transaction. Live and dead entries show in dlq_health as locked_events and
-- stale_locks.
--
-- Protocol (dlq_assets/worker.py):
--   session B: SELECT dlq_release_dead_batches();                   -- before each claim; commits on its own
--   session A: BEGIN; SELECT * FROM dlq_claim_batch(lease, n, ...);
--   session B: SELECT dlq_journal_batch(lease, ids, worker);        -- commits on its own
--   session A: ... dlq_claim_fragment_chains(lease, ...) (then journal those too), dlq_complete_batch(lease, ...),
--              target writes; COMMIT.
-- Committed leases (dlq_claim_events, dlq_heartbeat, dlq_release_stale_leases) work as before, side by side.

CREATE TABLE dlq_batch_leases (
    lease      uuid NOT NULL,
    event_ids  bigint[] NOT NULL,
    worker     text,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ix_dlq_batch_leases_lease ON dlq_batch_leases (lease);
COMMENT ON TABLE dlq_batch_leases IS
    'Journal of transaction leases: the events each running batch holds; an entry whose advisory lock is free is dead.';

-- The processor may journal only events it can see (row security on dead_letter_events applies inside the
-- policy), so it cannot reach a malicious row through a forged entry; it reads entries to tell its own rows.
ALTER TABLE dlq_batch_leases ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlq_batch_leases_read ON dlq_batch_leases FOR SELECT USING (true);
CREATE POLICY dlq_batch_leases_journal_visible_events ON dlq_batch_leases FOR INSERT TO dlq_processor_role
    WITH CHECK (NOT EXISTS (SELECT 1 FROM unnest(event_ids) AS i(id)
                             WHERE NOT EXISTS (SELECT 1 FROM dead_letter_events e WHERE e.id = i.id)));
GRANT SELECT, INSERT ON dlq_batch_leases TO dlq_processor_role;
GRANT SELECT ON dlq_batch_leases TO dlq_reader, security_admin;

-- The advisory lock key of a lease: its first 64 bits.
CREATE FUNCTION dlq_lease_key(p_lease uuid) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT ('x' || translate(left(p_lease::text, 18), '-', ''))::bit(64)::bigint $$;

-- The backend holding a lease's advisory lock, or NULL: its holder is gone (or it never was claimed).
CREATE FUNCTION dlq_lease_holder(p_lease uuid) RETURNS integer
    LANGUAGE sql STABLE STRICT SET search_path = public, pg_temp
AS $$
    SELECT l.pid FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.classid::bigint = (dlq_lease_key(p_lease) >> 32) & 4294967295
       AND l.objid::bigint = dlq_lease_key(p_lease) & 4294967295
     LIMIT 1
$$;

-- Claim a batch under a transaction lease: call inside a transaction, which holds the rows until it ends.
-- Same claimable rule and order as dlq_claim_events, but only rows without a committed lease.
CREATE FUNCTION dlq_claim_batch(
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
            AND ($1::integer IS NULL OR c.priority <= $1)
            AND ($2::text IS NULL OR c.reason = $2)
          ORDER BY c.priority, c.created_at, c.id
          LIMIT $3
            FOR UPDATE SKIP LOCKED'
    USING p_priority_max, p_reason, p_limit;
END
$$;

-- Journal a batch's events under its lease; call from a session other than the batch's, so it commits now.
CREATE FUNCTION dlq_journal_batch(p_lease uuid, p_ids bigint[], p_worker text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
BEGIN
    IF dlq_lease_holder(p_lease) IS NULL THEN
        RAISE EXCEPTION 'lease % is not held: claim with dlq_claim_batch inside a transaction, then journal from '
                        'another session', p_lease USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_ids) > 0 THEN
        INSERT INTO dlq_batch_leases (lease, event_ids, worker) VALUES (p_lease, p_ids, left(p_worker, 200));
    END IF;
END
$$;

-- Give back the events of batches whose holder died: one failed attempt (lease_expired) each, as for an
-- expired committed lease; expired committed leases too. Events another transaction holds now are left to it.
-- Call it outside any batch transaction. Returns how many events were counted.
CREATE FUNCTION dlq_release_dead_batches() RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_lease uuid;
    v_ids   bigint[];
    v_total integer := 0;
BEGIN
    FOR v_lease IN SELECT DISTINCT lease FROM dlq_batch_leases LOOP
        -- Alive: its holder has the lock (this session included). Dead: the lock is ours until we commit.
        CONTINUE WHEN dlq_lease_holder(v_lease) IS NOT NULL OR NOT pg_try_advisory_xact_lock(dlq_lease_key(v_lease));
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

-- Completion learns transaction leases: a row without a committed lease is this lease's when it is in the
-- lease's journal and this session holds the lease (its advisory lock). Such a row gets its claim recorded in
-- processing_attempts now (the claim itself wrote nothing), and the journal entry goes with the completion.
-- Everything else is as in 0003 (and 0010): fenced, set-based, quarantines never lifted.
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
    v_held       boolean;
    v_journal    bigint[];
    v_worker     text;
    v_claimed_at timestamptz;
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
    v_held := coalesce(dlq_lease_holder(p_lease) = pg_backend_pid(), false);
    IF v_held THEN
        SELECT array_agg(i), min(b.worker), min(b.claimed_at) INTO v_journal, v_worker, v_claimed_at
          FROM dlq_batch_leases b CROSS JOIN LATERAL unnest(b.event_ids) i WHERE b.lease = p_lease;
    END IF;
    RETURN QUERY
    WITH input AS (
        SELECT i.id, i.outcome, i.method, coalesce(i.error_class, 'error') AS error_class, i.message
          FROM unnest(p_ids, p_outcomes, p_methods, p_error_classes, p_messages)
               AS i(id, outcome, method, error_class, message)
    ), journal AS (
        SELECT DISTINCT j.id FROM unnest(v_journal) j(id)
    ), owned AS (
        SELECT e.id, e.created_at, e.retry_count, e.reason, i.outcome, i.method, i.error_class, i.message,
               e.processing_lock IS NULL AS by_transaction
          FROM dead_letter_events e
          JOIN input i ON i.id = e.id
         WHERE e.id = ANY (p_ids)  -- by primary key, partition by partition (the join alone scanned them)
           AND NOT e.resolved
           AND e.quarantined_at IS NULL  -- a quarantine is never lifted by a lease, however it was taken
           AND (e.processing_lock = p_lease
                OR (v_held AND e.processing_lock IS NULL AND e.id IN (SELECT j.id FROM journal j)))
           FOR UPDATE OF e
    ), policy AS MATERIALIZED (  -- once per (reason, error class), not per row (half the statement's time)
        SELECT k.reason AS for_reason, k.error_class AS for_error_class, pol.max_attempts, pol.backoff_base_seconds,
               pol.backoff_cap_seconds, pol.jitter, pol.retryable
          FROM (SELECT DISTINCT o.reason, o.error_class FROM owned o) k
         CROSS JOIN LATERAL dlq_retry_policy(k.reason, k.error_class) pol
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
                                  'message', left(o.message, 2000), 'lease', p_lease) AS history_entry,
               CASE WHEN o.by_transaction THEN jsonb_build_array(jsonb_build_object(
                   'lease', p_lease, 'claimed_at', v_claimed_at, 'worker', v_worker, 'attempt', o.retry_count + 1,
                   'as', 'transaction')) ELSE '[]'::jsonb END AS claim_entry
          FROM owned o
          JOIN policy pol ON pol.for_reason = o.reason AND pol.for_error_class = o.error_class
    ), updated AS (
        UPDATE dead_letter_events e
           SET processing_lock = NULL,
               lock_expires_at = NULL,
               last_processed_at = now(),
               processing_attempts = e.processing_attempts || d.claim_entry,
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
        RETURNING e.*, d.attempt, d.history_entry, d.poison_reason, d.claim_entry
    ), poisoned AS (
        INSERT INTO dlq_poison_events (
            id, ingest_id, source, source_offset, source_inode, reason, payload, metadata_json, payload_checksum,
            retry_count, error_history, processing_attempts, resolved, resolved_at, resolution_method,
            idempotency_key, processing_lock, lock_expires_at, priority, classification, quarantined_at,
            next_attempt_at, created_at, updated_at, last_processed_at, poisoned_at, poison_reason, last_error,
            redrive_count)
        SELECT m.id, m.ingest_id, m.source, m.source_offset, m.source_inode, m.reason, m.payload, m.metadata_json,
               m.payload_checksum, m.attempt, m.error_history || jsonb_build_array(m.history_entry),
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
    UNION ALL SELECT i.id, 'not_owned' FROM input i WHERE i.id NOT IN (SELECT o.id FROM owned o);
    IF v_held THEN
        DELETE FROM dlq_batch_leases WHERE lease = p_lease;
    END IF;
END
$$;

-- Stitching neighbours for a transaction lease: the seeds may be this lease's by transaction, and rows the
-- batch already holds (its journal) are never claimed again as neighbours. Otherwise as in 0009.
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
                   AND d.source_offset <= c.max_hi
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
           SELECT c.id FROM dead_letter_events c  -- by primary key: the ids first, as an array; and
            WHERE c.id = ANY (ARRAY(SELECT id FROM chain EXCEPT SELECT m.id FROM mine m))
              AND c.resolved IS NOT TRUE  -- not "NOT resolved", which let PostgreSQL 15 pick the whole
              AND c.quarantined_at IS NULL  -- claimable index instead (210 ms a call at 30k rows)
              AND (c.processing_lock IS NULL OR c.lock_expires_at <= now())
              FOR UPDATE SKIP LOCKED))
    RETURNING e.*
$$;

-- Health counts transaction leases too: events of live batches are locked, those of dead ones stale locks.
CREATE OR REPLACE VIEW dlq_health AS
WITH batches AS (
    SELECT count(*) FILTER (WHERE dlq_lease_holder(b.lease) IS NOT NULL) AS live_events,
           count(*) FILTER (WHERE dlq_lease_holder(b.lease) IS NULL) AS dead_events
      FROM dlq_batch_leases b CROSS JOIN LATERAL unnest(b.event_ids)
)
SELECT
    count(*) FILTER (WHERE NOT resolved AND quarantined_at IS NULL)                  AS pending_events,
    count(*) FILTER (WHERE resolved)                                                 AS processed_events,
    avg(extract(epoch FROM (resolved_at - created_at))) FILTER (WHERE resolved)      AS avg_resolution_time_seconds,
    min(created_at) FILTER (WHERE NOT resolved AND quarantined_at IS NULL)           AS oldest_unresolved_event,
    count(*) FILTER (WHERE retry_count > 5)                                          AS high_retry_events,
    count(*) FILTER (WHERE processing_lock IS NOT NULL AND lock_expires_at > now())
        + (SELECT live_events FROM batches)                                          AS locked_events,
    count(*) FILTER (WHERE processing_lock IS NOT NULL AND lock_expires_at <= now())
        + (SELECT dead_events FROM batches)                                          AS stale_locks,
    count(*) FILTER (WHERE classification = 'malicious')                             AS malicious_events,
    count(*) FILTER (WHERE priority <= 3 AND NOT resolved)                           AS high_priority_events,
    count(*) FILTER (WHERE quarantined_at IS NOT NULL)                               AS quarantined_events,
    (SELECT count(*) FROM dlq_poison_events)                                         AS poisoned_events,
    count(*)                                                                         AS total_events
FROM dead_letter_events;

REVOKE EXECUTE ON FUNCTION dlq_claim_batch(uuid, integer, integer, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dlq_journal_batch(uuid, bigint[], text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dlq_release_dead_batches() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_claim_batch(uuid, integer, integer, text) TO dlq_processor_role;
GRANT EXECUTE ON FUNCTION dlq_journal_batch(uuid, bigint[], text) TO dlq_processor_role;
GRANT EXECUTE ON FUNCTION dlq_release_dead_batches() TO dlq_processor_role;
