-- The health counters (dlq_event_counts): signed deltas per UTC month of created_at. Statement-level triggers on
-- dead_letter_events add one row per statement and month from the statement's transition tables (an UPDATE
-- counts its old rows out and its new rows in), so every writer keeps them exact without a per-row cost or a
-- shared row to contend on; now and then a statement folds the rows into one per month, and dlq_health sums
-- them. What no trigger sees is handled where it happens: retention dropping a month's partition drops that
-- month's counts in the same transaction; a TRUNCATE empties them; moving rows between partitions
-- (dlq_ensure_partitions) changes no count. dlq_recount_events() rebuilds them from the rows (after a partition
-- is truncated or dropped by hand).

-- The statement that adds the signed counts of a set of rows (a transition table, or the table itself) per
-- month: one definition for the trigger and the recount. Run with EXECUTE in the trigger function itself
-- (transition tables are visible there only). Statements that change no count add nothing.
CREATE OR REPLACE FUNCTION dlq_event_counts_sql(p_source text) RETURNS text
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

-- The health counters' statement trigger. A statement that changed no row adds nothing and plans nothing:
-- dlq_complete_batch runs a DELETE (its poisoned rows) in every batch, which almost always deletes nothing, and
-- building and planning the counting statement for it costs about 0.8 ms per batch (1.9 ms per batch in paired
-- completions on a 60k backlog; benchmarks/README.md).

CREATE OR REPLACE FUNCTION dlq_events_count_statement() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE  -- only what is counted, not the payloads
    v_columns CONSTANT text := 'created_at, resolved, resolved_at, quarantined_at, retry_count, classification, '
                               'priority';
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF EXISTS (SELECT FROM dlq_new_rows) THEN
            EXECUTE dlq_event_counts_sql(format('SELECT 1 AS sign, %s FROM dlq_new_rows', v_columns));
        END IF;
    ELSIF TG_OP = 'UPDATE' THEN
        IF EXISTS (SELECT FROM dlq_old_rows) THEN
            EXECUTE dlq_event_counts_sql(format('SELECT 1 AS sign, %s FROM dlq_new_rows UNION ALL '
                                                'SELECT -1, %s FROM dlq_old_rows', v_columns, v_columns));
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        IF EXISTS (SELECT FROM dlq_old_rows) THEN
            EXECUTE dlq_event_counts_sql(format('SELECT -1 AS sign, %s FROM dlq_old_rows', v_columns));
        END IF;
    ELSE  -- TRUNCATE of the whole table
        DELETE FROM dlq_event_counts;
    END IF;
    IF random() < 0.02 THEN  -- about every 50 statements: the view sums a few dozen rows, not thousands
        PERFORM dlq_event_counts_fold();
    END IF;
    RETURN NULL;
END
$$;

-- Fold the deltas into one row per month. One folder at a time; others skip.
CREATE OR REPLACE FUNCTION dlq_event_counts_fold() RETURNS void
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

-- Rebuild the counts from the rows themselves (a full scan; the table is locked against writers meanwhile).
CREATE OR REPLACE FUNCTION dlq_recount_events() RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
BEGIN
    LOCK TABLE dead_letter_events IN SHARE MODE;
    DELETE FROM dlq_event_counts;
    EXECUTE dlq_event_counts_sql('SELECT 1 AS sign, * FROM dead_letter_events');
    RETURN (SELECT coalesce(sum(total), 0) FROM dlq_event_counts);
END
$$;

CREATE OR REPLACE TRIGGER dead_letter_events_count_delete AFTER DELETE ON dead_letter_events REFERENCING OLD TABLE AS dlq_old_rows FOR EACH STATEMENT EXECUTE FUNCTION dlq_events_count_statement();

CREATE OR REPLACE TRIGGER dead_letter_events_count_insert AFTER INSERT ON dead_letter_events REFERENCING NEW TABLE AS dlq_new_rows FOR EACH STATEMENT EXECUTE FUNCTION dlq_events_count_statement();

CREATE OR REPLACE TRIGGER dead_letter_events_count_truncate AFTER TRUNCATE ON dead_letter_events FOR EACH STATEMENT EXECUTE FUNCTION dlq_events_count_statement();

CREATE OR REPLACE TRIGGER dead_letter_events_count_update AFTER UPDATE ON dead_letter_events REFERENCING OLD TABLE AS dlq_old_rows NEW TABLE AS dlq_new_rows FOR EACH STATEMENT EXECUTE FUNCTION dlq_events_count_statement();

-- Whenever this file is applied (a new database, a changed rule, a counting trigger that was missing and is back):
-- the counts rebuilt from the rows, since writes made while a trigger was missing went uncounted.
SELECT dlq_recount_events();
