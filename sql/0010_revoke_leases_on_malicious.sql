-- 0010: classifying an event malicious takes it out of any processor's hands at once.
--
-- dlq_complete_batch runs as its owner and fences on the lease alone, so a processor that leased an event
-- before security_admin classified it malicious could still complete it (and write its payload to the target).
-- Reclassifying now revokes the live lease in the same UPDATE: the holder's completion finds the event
-- not_owned, its heartbeat extends nothing, and row security keeps dlq_processor_role from leasing it again.
-- The revocation is recorded in processing_attempts; it is not a failed attempt.
CREATE FUNCTION dlq_revoke_lease_of_malicious() RETURNS trigger
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

CREATE TRIGGER dead_letter_events_revoke_malicious_lease BEFORE UPDATE OF classification ON dead_letter_events
    FOR EACH ROW WHEN (NEW.classification = 'malicious' AND OLD.classification IS DISTINCT FROM 'malicious')
    EXECUTE FUNCTION dlq_revoke_lease_of_malicious();

-- dlq_claim_fragment_chains (0009) replaced the per-event neighbour claim; nothing calls it any more.
DROP FUNCTION dlq_claim_neighbours(uuid, text, text, bigint, bigint, integer);
