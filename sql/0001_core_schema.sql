-- 0001: the DLQ core schema.
-- dead_letter_events holds every column of the design document's data model, range-partitioned by month
-- on created_at, plus what the design needs to work: next_attempt_at (backoff) and quarantined_at (tamper).
-- A UNIQUE constraint on a partitioned table must include the partition key, so global idempotency lives in
-- dlq_idempotency_keys, kept by the insert trigger.

-- The canonical payload form is jsonb::text; dlq_assets.jsonutil.canonical_json renders the same bytes.
CREATE FUNCTION dlq_payload_checksum(p_payload jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT encode(sha256(convert_to(p_payload::text, 'UTF8')), 'hex') $$;

CREATE TABLE dead_letter_events (
    id                  bigserial NOT NULL,
    ingest_id           varchar(64),
    source              varchar(512),
    source_offset       bigint,
    source_inode        varchar(128),
    reason              varchar(128) NOT NULL,
    payload             jsonb NOT NULL,
    metadata_json       jsonb,
    payload_checksum    varchar(64) NOT NULL,
    retry_count         integer NOT NULL DEFAULT 0,
    error_history       jsonb NOT NULL DEFAULT '[]'::jsonb,
    processing_attempts jsonb NOT NULL DEFAULT '[]'::jsonb,
    resolved            boolean NOT NULL DEFAULT false,
    resolved_at         timestamptz,
    resolution_method   varchar(64),
    idempotency_key     varchar(128) NOT NULL,
    processing_lock     uuid,
    lock_expires_at     timestamptz,
    priority            integer NOT NULL DEFAULT 5,
    classification      varchar(32),
    quarantined_at      timestamptz,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    last_processed_at   timestamptz,
    CONSTRAINT dead_letter_events_pkey PRIMARY KEY (id, created_at),
    CONSTRAINT dead_letter_events_priority_range CHECK (priority BETWEEN 1 AND 10),
    CONSTRAINT dead_letter_events_retry_count_nonnegative CHECK (retry_count >= 0),
    CONSTRAINT dead_letter_events_checksum_is_sha256 CHECK (payload_checksum ~ '^[0-9a-f]{64}$'),
    CONSTRAINT dead_letter_events_lease_complete CHECK ((processing_lock IS NULL) = (lock_expires_at IS NULL)),
    CONSTRAINT dead_letter_events_history_is_array CHECK (jsonb_typeof(error_history) = 'array'),
    CONSTRAINT dead_letter_events_attempts_is_array CHECK (jsonb_typeof(processing_attempts) = 'array')
) PARTITION BY RANGE (created_at);

COMMENT ON TABLE dead_letter_events IS 'Events a pipeline could not ingest; partitioned by month on created_at.';
COMMENT ON COLUMN dead_letter_events.payload_checksum IS 'SHA-256 of payload::text, fixed at insert; a mismatch later means tampering.';
COMMENT ON COLUMN dead_letter_events.next_attempt_at IS 'Not claimable before this time (retry backoff).';
COMMENT ON COLUMN dead_letter_events.quarantined_at IS 'Set when the event must never be reprocessed automatically (checksum mismatch).';

CREATE TABLE dead_letter_events_default PARTITION OF dead_letter_events DEFAULT;

-- Hot paths. Claim: unresolved, not quarantined, by priority then age.
CREATE INDEX ix_dead_letter_events_claimable ON dead_letter_events (priority, created_at, id)
    WHERE NOT resolved AND quarantined_at IS NULL;
-- Stale-lease sweeps and the stale-lock check.
CREATE INDEX ix_dead_letter_events_lease_expiry ON dead_letter_events (lock_expires_at)
    WHERE processing_lock IS NOT NULL;
-- Retention: resolved events by resolution time.
CREATE INDEX ix_dead_letter_events_resolved_at ON dead_letter_events (resolved_at) WHERE resolved;
-- Stitching fragments of one source in offset order, and re-ingest look-ups.
CREATE INDEX ix_dead_letter_events_source_offset ON dead_letter_events (source, source_offset);
-- Health counters that must stay cheap on a big table.
CREATE INDEX ix_dead_letter_events_high_retry ON dead_letter_events (retry_count) WHERE retry_count > 5;
CREATE INDEX ix_dead_letter_events_classification ON dead_letter_events (classification)
    WHERE classification IS NOT NULL;

CREATE TABLE dlq_idempotency_keys (
    idempotency_key  varchar(128) PRIMARY KEY,
    event_id         bigint NOT NULL,
    event_created_at timestamptz NOT NULL,
    first_seen_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dlq_idempotency_keys IS
    'One row per idempotency key ever accepted: global uniqueness across partitions, kept after retention.';

-- Insert: fix the checksum (or verify the producer's), derive a key when none is given, and keep exactly one
-- event per key: a second insert of a known key is skipped (the statement reports 0 rows), like ON CONFLICT
-- DO NOTHING across all partitions.
CREATE FUNCTION dlq_events_before_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_checksum text := dlq_payload_checksum(NEW.payload);
BEGIN
    IF NEW.payload_checksum IS NULL THEN
        NEW.payload_checksum := v_checksum;
    ELSIF NEW.payload_checksum <> v_checksum THEN
        RAISE EXCEPTION 'payload checksum % does not match the payload (its checksum is %)',
            NEW.payload_checksum, v_checksum
            USING ERRCODE = 'data_exception';
    END IF;
    IF NEW.idempotency_key IS NULL THEN
        NEW.idempotency_key := 'sha256:' || encode(sha256(convert_to(
            concat_ws('|', NEW.source, NEW.source_inode, NEW.source_offset, NEW.payload_checksum), 'UTF8')), 'hex');
    END IF;
    INSERT INTO dlq_idempotency_keys (idempotency_key, event_id, event_created_at)
    VALUES (NEW.idempotency_key, NEW.id, NEW.created_at)
    ON CONFLICT (idempotency_key) DO NOTHING;
    IF NOT FOUND THEN
        -- The key is known. The same event coming back (redriven from the poison table) keeps its key;
        -- anything else with that key is a second copy of a known event: skipped.
        IF EXISTS (SELECT 1 FROM dlq_idempotency_keys
                    WHERE idempotency_key = NEW.idempotency_key AND event_id = NEW.id) THEN
            RETURN NEW;
        END IF;
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER dead_letter_events_before_insert BEFORE INSERT ON dead_letter_events
    FOR EACH ROW EXECUTE FUNCTION dlq_events_before_insert();

-- Update: keep updated_at current; identity, checksum and partition key never change (a moved row would
-- re-run the insert trigger, and a rewritten checksum would hide tampering).
CREATE FUNCTION dlq_events_before_update() RETURNS trigger
    LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
BEGIN
    IF NEW.id <> OLD.id OR NEW.created_at <> OLD.created_at
       OR NEW.idempotency_key <> OLD.idempotency_key OR NEW.payload_checksum <> OLD.payload_checksum THEN
        RAISE EXCEPTION 'id, created_at, idempotency_key and payload_checksum of dead letter % are immutable', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER dead_letter_events_before_update BEFORE UPDATE ON dead_letter_events
    FOR EACH ROW EXECUTE FUNCTION dlq_events_before_update();

-- Monthly partitions. Rows that already sit in the default partition for a new month are moved into it, so
-- creating a partition never fails on data that arrived early or late.
CREATE FUNCTION dlq_partition_name(p_month timestamptz) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT 'dead_letter_events_p' || to_char(p_month AT TIME ZONE 'UTC', 'YYYYMM') $$;

CREATE FUNCTION dlq_ensure_partitions(p_from timestamptz DEFAULT now(), p_months_ahead integer DEFAULT 3)
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
CREATE VIEW dlq_partitions AS
SELECT c.relname::text AS partition_name,
       pg_get_expr(c.relpartbound, c.oid) AS bounds,
       c.relpartbound IS NOT NULL AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default,
       c.reltuples::bigint AS estimated_rows,
       pg_total_relation_size(c.oid) AS total_bytes
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'dead_letter_events'::regclass;

SELECT dlq_ensure_partitions(now() - interval '1 month', 3);

-- Where repaired and valid events land; idempotent on the record's position in its source.
CREATE TABLE raw_events (
    id               bigserial PRIMARY KEY,
    source           varchar(512) NOT NULL,
    source_inode     varchar(128) NOT NULL,
    source_offset    bigint NOT NULL,
    eventid          varchar(128) NOT NULL,
    session          varchar(64),
    src_ip           inet,
    event_timestamp  timestamptz,
    payload          jsonb NOT NULL,
    payload_checksum varchar(64) NOT NULL,
    original_text    text,
    dlq_event_id     bigint,
    repair_strategy  varchar(64),
    ingested_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT raw_events_source_position UNIQUE (source, source_inode, source_offset)
);
COMMENT ON COLUMN raw_events.original_text IS 'The record exactly as read, when the stored payload had to differ from it.';
COMMENT ON COLUMN raw_events.dlq_event_id IS 'The dead letter this event was repaired or redriven from, if any.';
CREATE INDEX ix_raw_events_eventid_timestamp ON raw_events (eventid, event_timestamp);
CREATE INDEX ix_raw_events_session ON raw_events (session);

-- One row per processed batch (the design's metrics table, plus the outcomes it left out).
CREATE TABLE dlq_processing_metrics (
    id                        bigserial PRIMARY KEY,
    processing_session_id     varchar(64) NOT NULL,
    processing_method         varchar(32) NOT NULL,
    batch_size                integer NOT NULL,
    processed_count           integer NOT NULL,
    repaired_count            integer NOT NULL,
    failed_count              integer NOT NULL,
    skipped_count             integer NOT NULL,
    quarantined_count         integer NOT NULL DEFAULT 0,
    poisoned_count            integer NOT NULL DEFAULT 0,
    processing_duration_ms    integer NOT NULL,
    avg_processing_time_ms    numeric(12, 3),
    circuit_breaker_name      varchar(64),
    circuit_breaker_triggered boolean NOT NULL DEFAULT false,
    started_at                timestamptz NOT NULL,
    completed_at              timestamptz NOT NULL,
    CONSTRAINT dlq_processing_metrics_counts_nonnegative CHECK (
        batch_size >= 0 AND processed_count >= 0 AND repaired_count >= 0 AND failed_count >= 0
        AND skipped_count >= 0 AND quarantined_count >= 0 AND poisoned_count >= 0 AND processing_duration_ms >= 0),
    CONSTRAINT dlq_processing_metrics_time_order CHECK (completed_at >= started_at)
);
CREATE INDEX ix_dlq_processing_metrics_completed_at ON dlq_processing_metrics (completed_at);

CREATE TABLE dlq_circuit_breaker_state (
    id                serial PRIMARY KEY,
    breaker_name      varchar(64) NOT NULL UNIQUE,
    state             varchar(16) NOT NULL DEFAULT 'closed',
    failure_count     integer NOT NULL DEFAULT 0,
    last_failure_time timestamptz,
    next_attempt_time timestamptz,
    failure_threshold integer NOT NULL DEFAULT 5,
    timeout_seconds   integer NOT NULL DEFAULT 60,
    half_open_probe   uuid,
    opened_at         timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dlq_circuit_breaker_state_valid CHECK (state IN ('closed', 'open', 'half_open')),
    CONSTRAINT dlq_circuit_breaker_threshold_positive CHECK (failure_threshold > 0 AND timeout_seconds >= 0),
    CONSTRAINT dlq_circuit_breaker_failures_nonnegative CHECK (failure_count >= 0)
);

-- The dead letter for dead letters: events that exhausted their retries or hit a non-retryable error, moved
-- here whole (every column, the full error and attempt history) and out of the processing path.
CREATE TABLE dlq_poison_events (
    LIKE dead_letter_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    poisoned_at     timestamptz NOT NULL DEFAULT now(),
    poison_reason   varchar(128) NOT NULL,
    last_error      jsonb,
    redrive_count   integer NOT NULL DEFAULT 0,
    CONSTRAINT dlq_poison_events_pkey PRIMARY KEY (id),
    CONSTRAINT dlq_poison_events_redrive_nonnegative CHECK (redrive_count >= 0)
);
CREATE INDEX ix_dlq_poison_events_poisoned_at ON dlq_poison_events (poisoned_at);
CREATE INDEX ix_dlq_poison_events_reason ON dlq_poison_events (reason);

-- The design's health view, corrected: the oldest unresolved event is MIN(created_at), not MAX; pending
-- excludes quarantined events; plus the counts the checks need.
CREATE VIEW dlq_health AS
SELECT
    count(*) FILTER (WHERE NOT resolved AND quarantined_at IS NULL)                  AS pending_events,
    count(*) FILTER (WHERE resolved)                                                 AS processed_events,
    avg(extract(epoch FROM (resolved_at - created_at))) FILTER (WHERE resolved)      AS avg_resolution_time_seconds,
    min(created_at) FILTER (WHERE NOT resolved AND quarantined_at IS NULL)           AS oldest_unresolved_event,
    count(*) FILTER (WHERE retry_count > 5)                                          AS high_retry_events,
    count(*) FILTER (WHERE processing_lock IS NOT NULL AND lock_expires_at > now())  AS locked_events,
    count(*) FILTER (WHERE processing_lock IS NOT NULL AND lock_expires_at <= now()) AS stale_locks,
    count(*) FILTER (WHERE classification = 'malicious')                             AS malicious_events,
    count(*) FILTER (WHERE priority <= 3 AND NOT resolved)                           AS high_priority_events,
    count(*) FILTER (WHERE quarantined_at IS NOT NULL)                               AS quarantined_events,
    (SELECT count(*) FROM dlq_poison_events)                                         AS poisoned_events,
    count(*)                                                                         AS total_events
FROM dead_letter_events;
