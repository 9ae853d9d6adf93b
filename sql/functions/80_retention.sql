-- Retention. Resolved events older than the retention period leave in small batches (one per call,
-- committed by the caller between calls, so no transaction holds row locks for long), and whole monthly
-- partitions whose every row has expired are detached and dropped.
-- Retention never touches unresolved, quarantined (kept for investigation) or poisoned events, and keeps
-- every dlq_idempotency_keys row: they are tombstones, without which re-reading a log would re-create an
-- event that was already resolved and retired.
-- The eligibility predicate is written out twice below (cleanup and preview); keep the two in step.

-- Why a partition cannot be dropped at this cutoff (NULL: it can), and its exact row count. Scans the partition.
CREATE OR REPLACE FUNCTION dlq_retention_partition_blockers(p_partition regclass, p_cutoff timestamptz,
                                                 OUT total_rows bigint, OUT why text)
    LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
DECLARE
    v_unresolved  bigint;
    v_quarantined bigint;
    v_recent      bigint;
    v_poisoned    bigint;
BEGIN
    EXECUTE format(
        'SELECT count(*), count(*) FILTER (WHERE NOT t.resolved), count(*) FILTER (WHERE t.quarantined_at IS NOT NULL),
                count(*) FILTER (WHERE t.resolved AND (t.resolved_at IS NULL OR t.resolved_at >= $1)), count(p.id)
           FROM %s t LEFT JOIN dlq_poison_events p ON p.id = t.id', p_partition)
    INTO total_rows, v_unresolved, v_quarantined, v_recent, v_poisoned
    USING p_cutoff;
    why := nullif(concat_ws(', ',
        CASE WHEN v_unresolved > 0 THEN v_unresolved || ' unresolved' END,
        CASE WHEN v_quarantined > 0 THEN v_quarantined || ' quarantined' END,
        CASE WHEN v_recent > 0 THEN v_recent || ' resolved within the retention period' END,
        CASE WHEN v_poisoned > 0 THEN v_poisoned || ' also in dlq_poison_events' END), '');
END
$$;

CREATE OR REPLACE FUNCTION dlq_retention_drop_partitions_uncounted(p_older_than_days integer DEFAULT 90, p_dry_run boolean DEFAULT false) RETURNS TABLE(partition_name text, rows bigint, action text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'public', 'pg_temp'
    SET lock_timeout TO '2s'
    AS $_$
DECLARE
    v_cutoff     timestamptz;
    v_this_month timestamptz := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_part       record;
    v_range      text[];
    v_upper      timestamptz;
    v_why        text;
    v_busy       boolean := false;
BEGIN
    IF p_older_than_days IS NULL OR p_older_than_days < 0 THEN
        RAISE EXCEPTION 'p_older_than_days must be 0 or more, got %', p_older_than_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_dry_run IS NULL THEN
        RAISE EXCEPTION 'p_dry_run must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT p_dry_run AND NOT pg_try_advisory_xact_lock(hashtext('dlq_retention_drop_partitions')) THEN
        RAISE EXCEPTION 'another retention run is dropping partitions' USING ERRCODE = 'lock_not_available';
    END IF;
    v_cutoff := now() - make_interval(days => p_older_than_days);
    FOR v_part IN
        SELECT c.oid::regclass AS rel, c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'dead_letter_events'::regclass
         ORDER BY c.relname
    LOOP
        partition_name := v_part.name;
        rows := NULL;
        -- The bound renders in this session's time zone, and casts back in the same one: exact.
        v_range := regexp_match(v_part.bound, '^FOR VALUES FROM \(''([^'']+)''\) TO \(''([^'']+)''\)$');
        v_upper := v_range[2]::timestamptz;
        IF v_part.bound = 'DEFAULT' THEN
            action := 'kept: default partition';
        ELSIF v_range IS NULL THEN
            action := 'kept: not a bounded range partition';
        ELSIF v_upper > v_this_month THEN
            action := 'kept: current or future month';
        ELSIF v_upper > v_cutoff THEN
            action := 'kept: range not entirely older than the cutoff';
        ELSE
            SELECT b.total_rows, b.why INTO rows, v_why FROM dlq_retention_partition_blockers(v_part.rel, v_cutoff) b;
            IF v_why IS NOT NULL THEN
                action := 'kept: ' || v_why;
            ELSIF p_dry_run THEN
                action := 'would drop';
            ELSIF v_busy THEN
                action := 'kept: table busy (lock_timeout), retry later';
            ELSE
                BEGIN
                    LOCK TABLE ONLY dead_letter_events IN ACCESS EXCLUSIVE MODE;
                    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', v_part.rel);
                    SELECT b.total_rows, b.why INTO rows, v_why
                      FROM dlq_retention_partition_blockers(v_part.rel, v_cutoff) b;
                    IF v_why IS NULL THEN
                        EXECUTE format('ALTER TABLE dead_letter_events DETACH PARTITION %s', v_part.rel);
                        EXECUTE format('DROP TABLE %s', v_part.rel);
                        action := 'dropped';
                    ELSE
                        action := 'kept: ' || v_why;
                    END IF;
                EXCEPTION WHEN lock_not_available THEN
                    v_busy := true;  -- one wait per run: the next partition would wait for the same lock
                    action := 'kept: table busy (lock_timeout), retry later';
                END;
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$_$;

CREATE OR REPLACE FUNCTION dlq_retention_drop_partitions(p_older_than_days integer DEFAULT 90, p_dry_run boolean DEFAULT false)
    RETURNS TABLE (partition_name text, rows bigint, action text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_bounds jsonb := (SELECT jsonb_object_agg(c.relname, pg_get_expr(c.relpartbound, c.oid))
                         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                        WHERE i.inhparent = 'dead_letter_events'::regclass);
    v_range  text[];
BEGIN
    FOR partition_name, rows, action IN
        SELECT d.partition_name, d.rows, d.action
          FROM dlq_retention_drop_partitions_uncounted(p_older_than_days, p_dry_run) d
    LOOP
        IF action = 'dropped' THEN
            -- The bound renders in this session's time zone and casts back in the same one: exact.
            v_range := regexp_match(v_bounds ->> partition_name,
                                    '^FOR VALUES FROM \(''([^'']+)''\) TO \(''([^'']+)''\)$');
            DELETE FROM dlq_event_counts
             WHERE month >= date_trunc('month', v_range[1]::timestamptz, 'UTC') AND month < v_range[2]::timestamptz;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- What a dry run reports: per partition, its rows, the rows the batched cleanup would delete from it, and
-- whether it would be dropped. sum(eligible_rows) is what a full run deletes.
CREATE OR REPLACE FUNCTION dlq_retention_preview(p_older_than_days integer DEFAULT 90)
    RETURNS TABLE (partition_name text, rows bigint, eligible_rows bigint, action text)
    LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    WITH eligible AS (
        SELECT e.tableoid, count(*) AS n
          FROM dead_letter_events e
         WHERE e.resolved AND e.resolved_at < now() - make_interval(days => p_older_than_days)
           AND e.quarantined_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM dlq_poison_events p WHERE p.id = e.id)
         GROUP BY e.tableoid
    ), named AS (
        SELECT c.relname::text AS name, el.n FROM eligible el JOIN pg_class c ON c.oid = el.tableoid
    )
    SELECT d.partition_name, d.rows, coalesce(n.n, 0), d.action
      FROM dlq_retention_drop_partitions(p_older_than_days, true) d
      LEFT JOIN named n ON n.name = d.partition_name
     ORDER BY d.partition_name
$$;

-- Delete one batch of expired resolved events, oldest resolution first; returns how many were deleted.
-- The batch is picked on the partial resolved_at index and locked with SKIP LOCKED, so retention never waits
-- on a worker (a locked row is left for the next run). Its keys are then deleted as constant arrays: the
-- planner prunes to the partitions holding them and probes their primary keys, where a join with the picked
-- rows is planned as a hash join over the whole table, every batch. id is unique (bigserial; only the owner can
-- set it), so matching id and created_at separately deletes exactly the picked rows. Both statements run
-- through EXECUTE so they are planned with the real values every time, like the claim.
CREATE OR REPLACE FUNCTION cleanup_resolved_dlq_events_enhanced(p_older_than_days integer DEFAULT 90,
                                                     p_batch_size integer DEFAULT 1000)
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_ids     bigint[];
    v_created timestamptz[];
    v_deleted integer;
BEGIN
    IF p_older_than_days IS NULL OR p_older_than_days < 0 THEN
        RAISE EXCEPTION 'p_older_than_days must be 0 or more, got %', p_older_than_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_batch_size IS NULL OR p_batch_size < 1 OR p_batch_size > 100000 THEN
        RAISE EXCEPTION 'p_batch_size must be between 1 and 100000, got %', p_batch_size
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE
        'SELECT array_agg(b.id), array_agg(b.created_at) FROM (
             SELECT c.id, c.created_at FROM dead_letter_events c
              WHERE c.resolved AND c.resolved_at < $1 AND c.quarantined_at IS NULL
                AND NOT EXISTS (SELECT 1 FROM dlq_poison_events p WHERE p.id = c.id)
              ORDER BY c.resolved_at
              LIMIT $2
                FOR UPDATE OF c SKIP LOCKED) b'
    INTO v_ids, v_created
    USING now() - make_interval(days => p_older_than_days), p_batch_size;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE 'DELETE FROM dead_letter_events e WHERE e.id = ANY ($1) AND e.created_at = ANY ($2)'
    USING v_ids, v_created;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END
$$;
