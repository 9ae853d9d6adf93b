-- Monthly partitions. Rows that already sit in the default partition for a new month are moved into it, so
-- creating a partition never fails on data that arrived early or late.
CREATE OR REPLACE FUNCTION dlq_partition_name(p_month timestamptz) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT 'dead_letter_events_p' || to_char(p_month AT TIME ZONE 'UTC', 'YYYYMM') $$;

CREATE OR REPLACE FUNCTION dlq_ensure_partitions(p_from timestamptz DEFAULT now(), p_months_ahead integer DEFAULT 3)
    RETURNS SETOF text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_month timestamptz := date_trunc('month', p_from AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_last  timestamptz := v_month + make_interval(months => p_months_ahead);
    v_next  timestamptz;
    v_name  text;
BEGIN
    IF p_months_ahead < 0 OR p_months_ahead > 120 THEN
        RAISE EXCEPTION 'p_months_ahead must be between 0 and 120, got %', p_months_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WHILE v_month <= v_last LOOP
        v_next := v_month + interval '1 month';
        v_name := dlq_partition_name(v_month);
        IF to_regclass(v_name) IS NULL THEN
            IF EXISTS (SELECT 1 FROM dead_letter_events_default
                       WHERE created_at >= v_month AND created_at < v_next) THEN
                LOCK TABLE dead_letter_events_default IN ACCESS EXCLUSIVE MODE;
                EXECUTE format('CREATE TABLE %I (LIKE dead_letter_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                               v_name);
                EXECUTE format('WITH moved AS (DELETE FROM dead_letter_events_default WHERE created_at >= %L '
                               'AND created_at < %L RETURNING *) INSERT INTO %I SELECT * FROM moved',
                               v_month, v_next, v_name);
                EXECUTE format('ALTER TABLE dead_letter_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               v_name, v_month, v_next);
            ELSE
                EXECUTE format('CREATE TABLE %I PARTITION OF dead_letter_events FOR VALUES FROM (%L) TO (%L)',
                               v_name, v_month, v_next);
            END IF;
            RETURN NEXT v_name;
        END IF;
        v_month := v_next;
    END LOOP;
END
$$;

-- Partitions with their bounds and sizes, for operators and the Dagster partitions asset.
CREATE OR REPLACE VIEW dlq_partitions AS
SELECT c.relname::text AS partition_name,
       pg_get_expr(c.relpartbound, c.oid) AS bounds,
       c.relpartbound IS NOT NULL AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default,
       NULLIF(c.reltuples, -1)::bigint AS estimated_rows,  -- -1: never analysed, so unknown (NULL)
       pg_total_relation_size(c.oid) AS total_bytes
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'dead_letter_events'::regclass;

-- Whenever this file is applied (a new database included): the partitions from last month to three months ahead.
-- The Dagster partitions asset keeps them ahead from then on.
SELECT dlq_ensure_partitions(now() - interval '1 month', 3);
