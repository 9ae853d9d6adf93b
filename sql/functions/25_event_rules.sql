-- Rules every write to dead_letter_events obeys, whoever writes: the insert trigger fixes the checksum and the
-- idempotency key, the update trigger keeps identity, checksum and history append-only, and classifying an event
-- malicious revokes its lease.

-- Insert: fix the checksum (or verify the producer's), derive a key when none is given, and keep exactly one
-- event per key: a second insert of a known key is skipped (the statement reports 0 rows), like ON CONFLICT
-- DO NOTHING across all partitions.
CREATE OR REPLACE FUNCTION dlq_events_before_insert() RETURNS trigger
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

-- Update: keep updated_at current; identity, checksum and partition key never change (a moved row would
-- re-run the insert trigger, and a rewritten checksum would hide tampering).
CREATE OR REPLACE FUNCTION dlq_events_before_update() RETURNS trigger
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

-- Classifying an event malicious takes it out of any processor's hands at once.
--
-- dlq_complete_batch runs as its owner and fences on the lease alone, so a processor that leased an event
-- before security_admin classified it malicious could otherwise still complete it (and write its payload to the
-- target). Reclassifying revokes the live lease in the same UPDATE: the holder's completion finds the event
-- not_owned, its heartbeat extends nothing, and row security keeps dlq_processor_role from leasing it again.
-- The revocation is recorded in processing_attempts; it is not a failed attempt.
CREATE OR REPLACE FUNCTION dlq_revoke_lease_of_malicious() RETURNS trigger
    LANGUAGE plpgsql SET search_path = public, pg_temp
AS $$
BEGIN
    IF NEW.processing_lock IS NOT NULL THEN
        NEW.processing_attempts := NEW.processing_attempts || jsonb_build_array(jsonb_build_object(
            'lease', NEW.processing_lock, 'revoked_at', now(), 'why', 'classified malicious'));
        NEW.processing_lock := NULL;
        NEW.lock_expires_at := NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER dead_letter_events_before_insert BEFORE INSERT ON dead_letter_events FOR EACH ROW EXECUTE FUNCTION dlq_events_before_insert();

CREATE OR REPLACE TRIGGER dead_letter_events_before_update BEFORE UPDATE ON dead_letter_events FOR EACH ROW WHEN (((new.updated_at IS DISTINCT FROM now()) OR (new.id <> old.id) OR (new.created_at <> old.created_at) OR ((new.idempotency_key)::text <> (old.idempotency_key)::text) OR ((new.payload_checksum)::text <> (old.payload_checksum)::text))) EXECUTE FUNCTION dlq_events_before_update();

CREATE OR REPLACE TRIGGER dead_letter_events_revoke_malicious_lease BEFORE UPDATE OF classification ON dead_letter_events FOR EACH ROW WHEN ((((new.classification)::text = 'malicious'::text) AND ((old.classification)::text IS DISTINCT FROM 'malicious'::text))) EXECUTE FUNCTION dlq_revoke_lease_of_malicious();
