-- 0017: the health counters' statement trigger skips a statement that changed no row.
--
-- dlq_complete_batch runs a DELETE (its poisoned rows) in every batch, and almost always it deletes nothing: the
-- AFTER DELETE trigger still fired, built its statement and planned it (EXECUTE), 0.8 ms per batch for nothing.
-- Measured alone on a 60k backlog, completions alternated batch by batch with and without this (80 pairs of
-- 1,000-row batches): -1.9 ms per batch, median of the paired differences (benchmarks/README.md, session 5).
-- The counts are those of 0012, unchanged.

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
