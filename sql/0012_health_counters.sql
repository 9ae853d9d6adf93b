-- 0012: dlq_health from maintained counters, so it stays fast on a big table (it scanned every row: 320-360 ms
-- at 1M; measured in benchmarks/README.md).
--
-- dlq_event_counts holds signed deltas per UTC month of created_at. Statement-level triggers on
-- dead_letter_events add one row per statement and month from the statement's transition tables (an UPDATE
-- counts its old rows out and its new rows in), so every writer keeps them exact without a per-row cost or a
-- shared row to contend on; now and then a statement folds the rows into one per month. The view sums them.
-- What no trigger sees is handled where it happens: retention dropping a month's partition drops that month's
-- counts in the same transaction; a TRUNCATE of the table empties them; moving rows between partitions
-- (dlq_ensure_partitions) changes no count. dlq_recount_events() rebuilds them from the rows (after a partition
-- was truncated or dropped by hand). The oldest unresolved event and the leases come from their indexes.

CREATE TABLE dlq_event_counts (
    month              timestamptz NOT NULL,
    total              bigint NOT NULL DEFAULT 0,
    pending            bigint NOT NULL DEFAULT 0,
    processed          bigint NOT NULL DEFAULT 0,
    resolution_seconds numeric NOT NULL DEFAULT 0,
    high_retry         bigint NOT NULL DEFAULT 0,
    malicious          bigint NOT NULL DEFAULT 0,
    high_priority      bigint NOT NULL DEFAULT 0,
    quarantined        bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE dlq_event_counts IS
    'Signed deltas of dead_letter_events counts per month, kept by statement triggers; dlq_health sums them.';

-- The statement that adds the signed counts of a set of rows (a transition table, or the table itself) per
-- month: one definition for the trigger and the recount. Run with EXECUTE in the trigger function itself
-- (transition tables are visible there only). Statements that change no count add nothing.
CREATE FUNCTION dlq_event_counts_sql(p_source text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT format($q$
        INSERT INTO dlq_event_counts (month, total, pending, processed, resolution_seconds, high_retry, malicious,
                                      high_priority, quarantined)
        SELECT * FROM (
            SELECT date_trunc('month', r.created_at, 'UTC') AS month,
                   sum(r.sign) AS total,
                   coalesce(sum(r.sign) FILTER (WHERE NOT r.resolved AND r.quarantined_at IS NULL), 0) AS pending,
                   coalesce(sum(r.sign) FILTER (WHERE r.resolved), 0) AS processed,
                   coalesce(sum(r.sign * extract(epoch FROM (r.resolved_at - r.created_at)))
                            FILTER (WHERE r.resolved), 0) AS resolution_seconds,
                   coalesce(sum(r.sign) FILTER (WHERE r.retry_count > 5), 0) AS high_retry,
                   coalesce(sum(r.sign) FILTER (WHERE r.classification = 'malicious'), 0) AS malicious,
                   coalesce(sum(r.sign) FILTER (WHERE r.priority <= 3 AND NOT r.resolved), 0) AS high_priority,
                   coalesce(sum(r.sign) FILTER (WHERE r.quarantined_at IS NOT NULL), 0) AS quarantined
              FROM (%s) r
             GROUP BY 1) c
         WHERE (total, pending, processed, resolution_seconds, high_retry, malicious, high_priority, quarantined)
               <> (0, 0, 0, 0, 0, 0, 0, 0)
    $q$, p_source)
$$;

-- Fold the deltas into one row per month. One folder at a time; others skip.
CREATE FUNCTION dlq_event_counts_fold() RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
BEGIN
    IF pg_try_advisory_xact_lock(hashtext('dlq_event_counts_fold')) THEN
        WITH gone AS (DELETE FROM dlq_event_counts RETURNING *)
        INSERT INTO dlq_event_counts
        SELECT month, sum(total), sum(pending), sum(processed), sum(resolution_seconds), sum(high_retry),
               sum(malicious), sum(high_priority), sum(quarantined)
          FROM gone GROUP BY month
        HAVING sum(total) <> 0 OR sum(pending) <> 0 OR sum(processed) <> 0 OR sum(high_retry) <> 0
            OR sum(malicious) <> 0 OR sum(high_priority) <> 0 OR sum(quarantined) <> 0;
    END IF;
END
$$;

CREATE FUNCTION dlq_events_count_statement() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE  -- only what is counted, not the payloads
    v_columns CONSTANT text := 'created_at, resolved, resolved_at, quarantined_at, retry_count, classification, '
                               'priority';
BEGIN
    IF TG_OP = 'INSERT' THEN
        EXECUTE dlq_event_counts_sql(format('SELECT 1 AS sign, %s FROM dlq_new_rows', v_columns));
    ELSIF TG_OP = 'UPDATE' THEN
        EXECUTE dlq_event_counts_sql(format('SELECT 1 AS sign, %s FROM dlq_new_rows UNION ALL '
                                            'SELECT -1, %s FROM dlq_old_rows', v_columns, v_columns));
    ELSIF TG_OP = 'DELETE' THEN
        EXECUTE dlq_event_counts_sql(format('SELECT -1 AS sign, %s FROM dlq_old_rows', v_columns));
    ELSE  -- TRUNCATE of the whole table
        DELETE FROM dlq_event_counts;
    END IF;
    IF random() < 0.02 THEN  -- about every 50 statements: the view sums a few dozen rows, not thousands
        PERFORM dlq_event_counts_fold();
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER dead_letter_events_count_insert AFTER INSERT ON dead_letter_events
    REFERENCING NEW TABLE AS dlq_new_rows FOR EACH STATEMENT EXECUTE FUNCTION dlq_events_count_statement();
CREATE TRIGGER dead_letter_events_count_update AFTER UPDATE ON dead_letter_events
    REFERENCING OLD TABLE AS dlq_old_rows NEW TABLE AS dlq_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dlq_events_count_statement();
CREATE TRIGGER dead_letter_events_count_delete AFTER DELETE ON dead_letter_events
    REFERENCING OLD TABLE AS dlq_old_rows FOR EACH STATEMENT EXECUTE FUNCTION dlq_events_count_statement();
CREATE TRIGGER dead_letter_events_count_truncate AFTER TRUNCATE ON dead_letter_events
    FOR EACH STATEMENT EXECUTE FUNCTION dlq_events_count_statement();

-- Rebuild the counts from the rows themselves (a full scan; the table is locked against writers meanwhile).
CREATE FUNCTION dlq_recount_events() RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
BEGIN
    LOCK TABLE dead_letter_events IN SHARE MODE;
    DELETE FROM dlq_event_counts;
    EXECUTE dlq_event_counts_sql('SELECT 1 AS sign, * FROM dead_letter_events');
    RETURN (SELECT coalesce(sum(total), 0) FROM dlq_event_counts);
END
$$;

SELECT dlq_recount_events();  -- the rows already there (the triggers' table lock keeps writers out until commit)

-- Retention: dropping a month's partition takes that month's rows, all of them (a partition's months can hold
-- rows nowhere else), so its counts go in the same transaction. The dropping itself is 0005's, unchanged.
ALTER FUNCTION dlq_retention_drop_partitions(integer, boolean) RENAME TO dlq_retention_drop_partitions_uncounted;

CREATE FUNCTION dlq_retention_drop_partitions(p_older_than_days integer DEFAULT 90, p_dry_run boolean DEFAULT false)
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

REVOKE EXECUTE ON FUNCTION dlq_retention_drop_partitions(integer, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dlq_recount_events() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dlq_event_counts_fold() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dlq_event_counts_sql(text) FROM PUBLIC;

-- Same columns, same meaning as before (0001, 0011); each from the counters or an index.
CREATE OR REPLACE VIEW dlq_health AS
WITH counts AS (
    SELECT coalesce(sum(total), 0)::bigint AS total, coalesce(sum(pending), 0)::bigint AS pending,
           coalesce(sum(processed), 0)::bigint AS processed, sum(resolution_seconds) AS resolution_seconds,
           coalesce(sum(high_retry), 0)::bigint AS high_retry, coalesce(sum(malicious), 0)::bigint AS malicious,
           coalesce(sum(high_priority), 0)::bigint AS high_priority,
           coalesce(sum(quarantined), 0)::bigint AS quarantined
      FROM dlq_event_counts
), batches AS (
    SELECT count(*) FILTER (WHERE dlq_lease_holder(b.lease) IS NOT NULL) AS live_events,
           count(*) FILTER (WHERE dlq_lease_holder(b.lease) IS NULL) AS dead_events
      FROM dlq_batch_leases b CROSS JOIN LATERAL unnest(b.event_ids)
), leases AS (  -- committed leases, on their partial index
    SELECT count(*) FILTER (WHERE lock_expires_at > now()) AS live_events,
           count(*) FILTER (WHERE lock_expires_at <= now()) AS stale_events
      FROM dead_letter_events WHERE processing_lock IS NOT NULL
), oldest AS (  -- per priority, the first entry of the claimable index: ten index probes, not a scan
    SELECT min(first.created_at) AS created_at
      FROM generate_series(1, 10) AS p(priority)
     CROSS JOIN LATERAL (SELECT e.created_at FROM dead_letter_events e
                          WHERE e.priority = p.priority AND NOT e.resolved AND e.quarantined_at IS NULL
                          ORDER BY e.created_at LIMIT 1) first
)
SELECT
    c.pending                                                              AS pending_events,
    c.processed                                                            AS processed_events,
    c.resolution_seconds / nullif(c.processed, 0)                          AS avg_resolution_time_seconds,
    (SELECT created_at FROM oldest)                                        AS oldest_unresolved_event,
    c.high_retry                                                           AS high_retry_events,
    (SELECT live_events FROM leases) + (SELECT live_events FROM batches)   AS locked_events,
    (SELECT stale_events FROM leases) + (SELECT dead_events FROM batches)  AS stale_locks,
    c.malicious                                                            AS malicious_events,
    c.high_priority                                                        AS high_priority_events,
    c.quarantined                                                          AS quarantined_events,
    (SELECT count(*) FROM dlq_poison_events)                               AS poisoned_events,
    c.total                                                                AS total_events
FROM counts c;
