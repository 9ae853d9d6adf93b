-- raw_events.payload_checksum is derived by the table from the payload it stores, as dead letters' checksums are
-- (their insert trigger), rather than sent by every writer: it always describes the stored payload, and writers
-- send an event's own text as its payload (jsonb reads it as the reader's parser did) instead of rendering the
-- canonical form first (a fifth of intake's Python time).
--
-- The expression is dlq_payload_checksum's in immutable functions, as a generated column needs: convert_to() is
-- only stable, while in a UTF-8 database decode(..., 'escape') takes a text's bytes, its UTF-8, as they are once
-- its backslashes are doubled. A database in another encoding would checksum other bytes: it is refused.
DO $$
BEGIN
    IF current_setting('server_encoding') <> 'UTF8' THEN
        RAISE EXCEPTION 'the DLQ needs a UTF8 database; this one is %', current_setting('server_encoding')
            USING HINT = 'CREATE DATABASE ... ENCODING ''UTF8'' TEMPLATE template0';
    END IF;
END
$$;

ALTER TABLE raw_events DROP COLUMN payload_checksum;

ALTER TABLE raw_events ADD COLUMN payload_checksum varchar(64) NOT NULL
    GENERATED ALWAYS AS (encode(sha256(decode(replace(payload::text, '\', '\\'), 'escape')), 'hex')) STORED;

COMMENT ON COLUMN raw_events.payload_checksum IS
    'SHA-256 of payload::text (dlq_payload_checksum), derived by the table from the stored payload.';
