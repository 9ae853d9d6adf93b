-- 0002: roles, grants and row-level security.
-- dlq_processor_role processes dead letters but never sees, writes or reclassifies malicious ones;
-- dlq_reader reads for reporting and writes nothing; security_admin sees everything and alone changes
-- classification. The design's policy (classification != 'malicious') hid every unclassified row, because
-- NULL != 'malicious' is NULL: IS DISTINCT FROM keeps them visible.
-- Roles are cluster-wide, so they are created once and reused by every database on the server.

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['dlq_processor_role', 'dlq_reader', 'security_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
    END LOOP;
END
$$;

-- Nobody but the owner creates objects in the schema the SECURITY DEFINER functions resolve names in.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO dlq_processor_role, dlq_reader, security_admin;

-- Nobody runs the privileged maintenance functions unless granted.
REVOKE EXECUTE ON FUNCTION dlq_ensure_partitions(timestamptz, integer) FROM PUBLIC;

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
GRANT SELECT, INSERT, UPDATE ON dlq_circuit_breaker_state TO dlq_processor_role;
GRANT USAGE ON SEQUENCE dlq_circuit_breaker_state_id_seq TO dlq_processor_role;

-- Reporting: aggregate views run with their owner's rights, so readers see counts (malicious included)
-- but never the malicious rows themselves.
GRANT SELECT ON raw_events, dlq_processing_metrics, dlq_circuit_breaker_state, dlq_health, dlq_partitions
    TO dlq_reader, security_admin;
GRANT SELECT ON dlq_health, dlq_partitions TO dlq_processor_role;
