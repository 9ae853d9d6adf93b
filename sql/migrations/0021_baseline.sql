-- The DLQ schema: tables, indexes, roles, grants, row security and reference data.
--
-- Every function, view and trigger lives in sql/functions/, applied after the migrations. This baseline is the
-- schema that migrations 0001-0021 of the pre-baseline chain built: a database that applied that chain keeps its
-- ledger rows and never runs this file (dlq_assets/core/migrations.py accepts exactly that chain's files in
-- their place). A change to a table is a new migration, 0022 onwards.

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
    -- Length and character set, not a regular expression: PostgreSQL re-checks every CHECK on every UPDATE, and
    -- a regular expression here is the largest single cost of claims and completions in a profile of the worker.
    CONSTRAINT dead_letter_events_checksum_is_sha256
        CHECK (length(payload_checksum) = 64 AND ltrim(payload_checksum, '0123456789abcdef') = ''),
    CONSTRAINT dead_letter_events_lease_complete CHECK ((processing_lock IS NULL) = (lock_expires_at IS NULL)),
    CONSTRAINT dead_letter_events_history_is_array CHECK (jsonb_typeof(error_history) = 'array'),
    CONSTRAINT dead_letter_events_attempts_is_array CHECK (jsonb_typeof(processing_attempts) = 'array')
) PARTITION BY RANGE (created_at);

COMMENT ON TABLE dead_letter_events IS 'Events a pipeline could not ingest; partitioned by month on created_at.';

COMMENT ON COLUMN dead_letter_events.payload_checksum IS 'SHA-256 of payload::text, fixed at insert; a mismatch later means tampering.';

COMMENT ON COLUMN dead_letter_events.next_attempt_at IS 'Not claimable before this time (retry backoff).';

COMMENT ON COLUMN dead_letter_events.quarantined_at IS 'Set when the event must never be reprocessed automatically (checksum mismatch).';

CREATE TABLE dead_letter_events_default PARTITION OF dead_letter_events DEFAULT;

-- Hot paths. Claim: unresolved, not quarantined, by priority then age. Events waiting out a backoff stay in the
-- partial index (its predicate cannot depend on now()) and gather at its front; next_attempt_at as the last key
-- column lets a claim test "next_attempt_at <= now()" on the index entry instead of fetching each waiting row
-- from the heap (190 ms per claim at 1M dead letters with 110k waiting, without it).
CREATE INDEX ix_dead_letter_events_claimable ON dead_letter_events (priority, created_at, id, next_attempt_at)
    WHERE NOT resolved AND quarantined_at IS NULL;

-- Stale-lease sweeps and the stale-lock check.
CREATE INDEX ix_dead_letter_events_lease_expiry ON dead_letter_events (lock_expires_at)
    WHERE processing_lock IS NOT NULL;

-- Retention: resolved events by resolution time.
CREATE INDEX ix_dead_letter_events_resolved_at ON dead_letter_events (resolved_at) WHERE resolved;

-- Stitching fragments of one source in offset order. Its readers look for unresolved neighbours only, so the
-- index holds unresolved rows: a resolution writes no entry here, and the index stays the size of the backlog.
-- Records never overlap, so the nearest unresolved record is the nearest record whenever it is adjacent.
CREATE INDEX ix_dead_letter_events_source_offset ON dead_letter_events (source, source_offset) WHERE NOT resolved;

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
    partial          boolean NOT NULL DEFAULT false,
    duplicate_keys   boolean NOT NULL DEFAULT false,
    CONSTRAINT raw_events_source_position UNIQUE (source, source_inode, source_offset)
);

COMMENT ON COLUMN raw_events.original_text IS 'The record exactly as read, when the stored payload had to differ from it.';

COMMENT ON COLUMN raw_events.dlq_event_id IS 'The dead letter this event was repaired or redriven from, if any.';

CREATE INDEX ix_raw_events_eventid_timestamp ON raw_events (eventid, event_timestamp);

CREATE INDEX ix_raw_events_session ON raw_events (session);

-- A record cut right after a complete value can be closed into a valid Cowrie event (repair strategy
-- truncation_closed), but nothing proves the cut took only closing brackets: such an event is stored, and
-- marked, never passed off as whole. Analysts filter on the column; the partial index keeps the few marked rows
-- cheap to find however large the table grows.
COMMENT ON COLUMN raw_events.partial IS
    'True when the event was rebuilt from a cut record by closing its brackets: later attributes may be missing.';

CREATE INDEX ix_raw_events_partial ON raw_events (event_timestamp) WHERE partial;

-- Duplicate keys: jsonb keeps the last of them, so a record that had any keeps its exact text in original_text
-- and is flagged here; the partial index finds the few flagged rows cheaply.
COMMENT ON COLUMN raw_events.duplicate_keys IS
    'True when the record held a key twice in one object: payload keeps the last value (as jsonb does), '
    'original_text the record as written.';

CREATE INDEX ix_raw_events_duplicate_keys ON raw_events (event_timestamp) WHERE duplicate_keys;

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
    CONSTRAINT dlq_circuit_breaker_failures_nonnegative CHECK (failure_count >= 0),
    CONSTRAINT dlq_circuit_breaker_bounds
        CHECK (failure_threshold BETWEEN 1 AND 10000 AND timeout_seconds BETWEEN 1 AND 3600
               AND failure_count <= 1000000)
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

-- Roles, grants and row-level security.
-- dlq_processor_role processes dead letters but never sees, writes or reclassifies malicious ones;
-- dlq_reader reads for reporting and writes nothing; security_admin sees everything and alone changes
-- classification. The design's policy (classification != 'malicious') hid every unclassified row, because
-- NULL != 'malicious' is NULL: IS DISTINCT FROM keeps them visible.
-- Roles are cluster-wide, so they are created once and reused by every database on the server; the advisory
-- lock is per database, so two databases migrated at once may both try to create one.

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['dlq_processor_role', 'dlq_reader', 'security_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created at the same moment by a migration of another database on this server
            END;
        END IF;
    END LOOP;
END
$$;

-- Nobody but the owner creates objects in the schema the SECURITY DEFINER functions resolve names in.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

GRANT USAGE ON SCHEMA public TO dlq_processor_role, dlq_reader, security_admin;

-- dead_letter_events. The processor writes only the lease columns directly (claim and heartbeat run with its
-- rights, so row security applies to them); every outcome (resolve, retry, poison, quarantine) goes through
-- SECURITY DEFINER functions that touch only the rows its lease holds, so it can neither forge history, nor
-- lift a quarantine, nor delete a dead letter.
GRANT SELECT ON dead_letter_events TO dlq_processor_role;

GRANT INSERT (ingest_id, source, source_offset, source_inode, reason, payload, metadata_json, payload_checksum,
              idempotency_key, priority, created_at)
    ON dead_letter_events TO dlq_processor_role;

GRANT UPDATE (processing_lock, lock_expires_at, last_processed_at, processing_attempts)
    ON dead_letter_events TO dlq_processor_role;

GRANT USAGE ON SEQUENCE dead_letter_events_id_seq TO dlq_processor_role;

GRANT SELECT ON dead_letter_events TO dlq_reader;

GRANT SELECT, UPDATE (classification) ON dead_letter_events TO security_admin;

ALTER TABLE dead_letter_events ENABLE ROW LEVEL SECURITY;

CREATE POLICY dlq_hide_malicious ON dead_letter_events
    FOR ALL TO dlq_processor_role, dlq_reader
    USING (classification IS DISTINCT FROM 'malicious')
    WITH CHECK (classification IS DISTINCT FROM 'malicious');

CREATE POLICY dlq_security_admin_all ON dead_letter_events
    FOR ALL TO security_admin
    USING (true)
    WITH CHECK (true);

-- The poison table holds the same rows, so the same rules; rows move in and out only through functions.
GRANT SELECT ON dlq_poison_events TO dlq_processor_role, dlq_reader;

GRANT SELECT, UPDATE (classification) ON dlq_poison_events TO security_admin;

ALTER TABLE dlq_poison_events ENABLE ROW LEVEL SECURITY;

CREATE POLICY dlq_poison_hide_malicious ON dlq_poison_events
    FOR ALL TO dlq_processor_role, dlq_reader
    USING (classification IS DISTINCT FROM 'malicious')
    WITH CHECK (classification IS DISTINCT FROM 'malicious');

CREATE POLICY dlq_poison_security_admin_all ON dlq_poison_events
    FOR ALL TO security_admin
    USING (true)
    WITH CHECK (true);

-- Processing bookkeeping and the target.
GRANT SELECT, INSERT ON raw_events, dlq_processing_metrics TO dlq_processor_role;

GRANT USAGE ON SEQUENCE raw_events_id_seq, dlq_processing_metrics_id_seq TO dlq_processor_role;

-- The breaker. Processors record outcomes through the functions; they neither write its row nor configure it.
GRANT SELECT ON dlq_circuit_breaker_state TO dlq_processor_role;

-- Reporting (the views' grants are with the views, in sql/functions/).
GRANT SELECT ON raw_events, dlq_processing_metrics, dlq_circuit_breaker_state TO dlq_reader, security_admin;

-- Retry policy per reason and error class; the most specific row wins (reason+class, class, reason, default).
CREATE TABLE dlq_retry_policies (
    id                   serial PRIMARY KEY,
    reason               varchar(128),
    error_class          varchar(128),
    max_attempts         integer NOT NULL DEFAULT 10,
    backoff_base_seconds numeric NOT NULL DEFAULT 30,
    backoff_cap_seconds  numeric NOT NULL DEFAULT 3600,
    jitter               numeric NOT NULL DEFAULT 0.2,
    retryable            boolean NOT NULL DEFAULT true,
    CONSTRAINT dlq_retry_policies_one_per_pair UNIQUE NULLS NOT DISTINCT (reason, error_class),
    CONSTRAINT dlq_retry_policies_sane CHECK (
        max_attempts BETWEEN 1 AND 1000 AND backoff_base_seconds >= 0
        AND backoff_cap_seconds >= backoff_base_seconds AND jitter BETWEEN 0 AND 1)
);

COMMENT ON TABLE dlq_retry_policies IS
    'Retry policy per (reason, error_class); NULL matches any. Most specific match wins.';

INSERT INTO dlq_retry_policies (reason, error_class, max_attempts, backoff_base_seconds, backoff_cap_seconds, jitter,
                                retryable) VALUES
    (NULL, NULL,             10, 30,   3600,  0.2, true),   -- the design: exponential backoff, max 10 attempts
    (NULL, 'lease_expired',  10, 0,    0,     0,   true),   -- a crashed worker: retry at once, still counted
    (NULL, 'unrepairable',   3,  3600, 86400, 0.2, true),   -- bad bytes: wait for neighbouring fragments, then poison
    (NULL, 'invalid_event',  3,  3600, 86400, 0.2, true),
    (NULL, 'handler_missing', 1, 0,    0,     0,   false);

GRANT SELECT ON dlq_retry_policies TO dlq_processor_role, dlq_reader, security_admin;

-- The Cowrie rules the in-database path checks (dlq_cowrie_validation_errors); they mirror
-- dlq_assets/core/cowrie.py, and tests/core/processing/test_process_in_database.py holds the two together.
CREATE TABLE dlq_cowrie_event_ids (
    eventid             text PRIMARY KEY,
    required_attributes text[] NOT NULL
);

COMMENT ON TABLE dlq_cowrie_event_ids IS
    'Cowrie''s event catalogue (src/cowrie/core/eventids.py) and the attributes each event always carries.';

INSERT INTO dlq_cowrie_event_ids (eventid, required_attributes) VALUES
    ('cowrie.abuseipdb.ratelimited', '{}'::text[]),
    ('cowrie.abuseipdb.reportedip', '{}'::text[]),
    ('cowrie.abuseipdb.reportfail', '{}'::text[]),
    ('cowrie.abuseipdb.started', '{}'::text[]),
    ('cowrie.abuseipdb.wakeup', '{}'::text[]),
    ('cowrie.client.fingerprint', ARRAY['username', 'fingerprint']::text[]),
    ('cowrie.client.kex', '{}'::text[]),
    ('cowrie.client.malformed_packet', '{}'::text[]),
    ('cowrie.client.size', ARRAY['width', 'height']::text[]),
    ('cowrie.client.var', ARRAY['name', 'value']::text[]),
    ('cowrie.client.version', ARRAY['version']::text[]),
    ('cowrie.command.chpasswd', '{}'::text[]),
    ('cowrie.command.failed', ARRAY['input']::text[]),
    ('cowrie.command.input', ARRAY['input']::text[]),
    ('cowrie.command.success', ARRAY['input']::text[]),
    ('cowrie.direct-tcpip.data', '{}'::text[]),
    ('cowrie.direct-tcpip.ja4', '{}'::text[]),
    ('cowrie.direct-tcpip.ja4h', '{}'::text[]),
    ('cowrie.direct-tcpip.redirect', '{}'::text[]),
    ('cowrie.direct-tcpip.request', '{}'::text[]),
    ('cowrie.direct-tcpip.tunnel', '{}'::text[]),
    ('cowrie.greynoise.result', '{}'::text[]),
    ('cowrie.log.closed', ARRAY['ttylog']::text[]),
    ('cowrie.log.open', ARRAY['ttylog']::text[]),
    ('cowrie.login.failed', ARRAY['username']::text[]),
    ('cowrie.login.success', ARRAY['username']::text[]),
    ('cowrie.proxy.backend_connect_error', '{}'::text[]),
    ('cowrie.proxy.backend_connected', '{}'::text[]),
    ('cowrie.proxy.backend_disconnected', '{}'::text[]),
    ('cowrie.proxy.client_disconnect', '{}'::text[]),
    ('cowrie.proxy.ssh', '{}'::text[]),
    ('cowrie.reversedns.connect', '{}'::text[]),
    ('cowrie.reversedns.forward', '{}'::text[]),
    ('cowrie.session.closed', '{}'::text[]),
    ('cowrie.session.connect', '{}'::text[]),
    ('cowrie.session.file_download', ARRAY['shasum']::text[]),
    ('cowrie.session.file_download.failed', ARRAY['url']::text[]),
    ('cowrie.session.file_upload', ARRAY['filename', 'shasum']::text[]),
    ('cowrie.session.input', ARRAY['input']::text[]),
    ('cowrie.session.params', ARRAY['arch']::text[]),
    ('cowrie.telnet.error', '{}'::text[]),
    ('cowrie.telnet.exploit_attempt', '{}'::text[]),
    ('cowrie.telnet.exploit_success', '{}'::text[]),
    ('cowrie.telnet.option', '{}'::text[]),
    ('cowrie.tunnelproxy-tcpip.data', '{}'::text[]),
    ('cowrie.urlhaus.submitted', '{}'::text[]),
    ('cowrie.virustotal.scanfile', '{}'::text[]),
    ('cowrie.virustotal.scanurl', '{}'::text[])
;

GRANT SELECT ON dlq_cowrie_event_ids TO dlq_processor_role, dlq_reader, security_admin;

-- The journal of transaction leases (protocol in sql/functions/40_claims.sql): the events each running batch
-- holds. An entry whose advisory lock nobody holds belongs to a batch whose holder died.
CREATE TABLE dlq_batch_leases (
    lease      uuid NOT NULL,
    event_ids  bigint[] NOT NULL,
    worker     text,
    claimed_at timestamptz NOT NULL DEFAULT now()
);

-- A 1,000-event batch journals 8 KB of ids, read back and deleted within the same second: stored out of line
-- but uncompressed, since pglz compression and decompression cost more than they save (2.1 ms against 0.9 ms
-- for journal, read back and delete of 1,000 ids; benchmarks/README.md).
ALTER TABLE dlq_batch_leases ALTER COLUMN event_ids SET STORAGE EXTERNAL;

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

-- dlq_health reads maintained counters, so it stays fast on a big table. dlq_event_counts holds signed deltas per
-- UTC month of created_at, written by statement-level triggers (sql/functions/20_counts.sql).
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
