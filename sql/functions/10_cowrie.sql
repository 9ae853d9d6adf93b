-- Cowrie's rules, checked in the database: addresses, ports, timestamps, the event catalogue
-- (dlq_cowrie_event_ids) and the attributes each event carries. They mirror dlq_assets/core/cowrie.py, and
-- tests/core/processing/test_process_in_database.py holds the two together. Also the payload checksum and the
-- record length the claims read.

CREATE OR REPLACE FUNCTION dlq_is_ip(p_value jsonb) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE SET search_path = public, pg_temp
AS $$
DECLARE
    v_text text;
    v_inet inet;
BEGIN
    IF jsonb_typeof(p_value) IS DISTINCT FROM 'string' THEN
        RETURN false;
    END IF;
    v_text := p_value #>> '{}';
    IF v_text ~ '^[0-9.]+$' THEN  -- IPv4: four decimal octets without leading zeros, as Python's ipaddress wants
        RETURN v_text ~ '^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])$';
    END IF;
    IF v_text !~ '^[0-9A-Fa-f:.]+$' THEN
        RETURN false;
    END IF;
    v_inet := v_text::inet;
    RETURN family(v_inet) = 6 AND masklen(v_inet) = 128;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN false;
END
$$;

CREATE OR REPLACE FUNCTION dlq_is_port(p_value jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE SET search_path = public, pg_temp
AS $$
    SELECT jsonb_typeof(p_value) = 'number' AND (p_value #>> '{}')::numeric = trunc((p_value #>> '{}')::numeric)
           AND (p_value #>> '{}')::numeric BETWEEN 0 AND 65535
$$;

-- A timestamp PostgreSQL cannot store is not a Cowrie timestamp: offsets past 15:59 (timestamptz's limit; the
-- Python validator agrees, dlq_assets/cowrie.py), which would otherwise fail the target write of a whole batch.
CREATE OR REPLACE FUNCTION dlq_is_cowrie_timestamp(p_value jsonb) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE SET search_path = public, pg_temp
AS $$
DECLARE
    v_parts text[];
BEGIN
    IF jsonb_typeof(p_value) IS DISTINCT FROM 'string' THEN
        RETURN false;
    END IF;
    v_parts := regexp_match(p_value #>> '{}',
        '^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,6})?(Z|[+-]([0-9]{2}):?([0-9]{2}))$');
    IF v_parts IS NULL OR v_parts[4]::int > 23 OR v_parts[6]::int > 59  -- PostgreSQL takes 24:00 and :60
       OR (v_parts[9] IS NOT NULL AND (v_parts[9]::int > 15 OR v_parts[10]::int > 59)) THEN
        RETURN false;
    END IF;
    PERFORM make_timestamp(v_parts[1]::int, v_parts[2]::int, v_parts[3]::int, v_parts[4]::int, v_parts[5]::int,
                           v_parts[6]::double precision);
    RETURN true;
EXCEPTION WHEN datetime_field_overflow THEN
    RETURN false;  -- month 13, day 31 of a 30-day month, hour 24, ...: not a timestamp
END
$$;

-- The same rules as dlq_assets.cowrie.validate_event; returns the error codes (empty: valid).
CREATE OR REPLACE FUNCTION dlq_cowrie_validation_errors(p_event jsonb) RETURNS text[]
    LANGUAGE plpgsql STABLE SET search_path = public, pg_temp
AS $$
DECLARE
    v_errors   text[] := '{}';
    v_eventid  text;
    v_known    dlq_cowrie_event_ids;
    v_field    text;
    v_required text;
BEGIN
    IF jsonb_typeof(p_event) IS DISTINCT FROM 'object' THEN
        RETURN ARRAY['not_an_object'];
    END IF;
    IF jsonb_typeof(p_event -> 'eventid') = 'string' THEN
        v_eventid := p_event ->> 'eventid';
        SELECT * INTO v_known FROM dlq_cowrie_event_ids WHERE eventid = v_eventid;
    END IF;
    IF NOT p_event ? 'eventid' THEN
        v_errors := v_errors || 'missing_eventid'::text;
    ELSIF v_known.eventid IS NULL THEN
        v_errors := v_errors || ('unknown_eventid: ' || coalesce(p_event ->> 'eventid', 'null'));
    END IF;
    IF NOT p_event ? 'timestamp' THEN
        v_errors := v_errors || 'missing_timestamp'::text;
    ELSIF NOT dlq_is_cowrie_timestamp(p_event -> 'timestamp') THEN
        v_errors := v_errors || ('invalid_timestamp_format: ' || coalesce(p_event ->> 'timestamp', 'null'));
    END IF;
    IF p_event ? 'session' THEN
        IF jsonb_typeof(p_event -> 'session') IS DISTINCT FROM 'string'
           OR (p_event ->> 'session') !~ '^([0-9a-f]{12}|[0-9a-fA-F]{8})$' THEN
            v_errors := v_errors || ('invalid_session_id_format: ' || coalesce(p_event ->> 'session', 'null'));
        END IF;
    ELSIF v_known.eventid IS NULL OR v_eventid NOT LIKE 'cowrie.abuseipdb.%' THEN
        v_errors := v_errors || 'missing_session'::text;
    END IF;
    IF p_event ? 'src_ip' AND NOT dlq_is_ip(p_event -> 'src_ip') THEN
        v_errors := v_errors || ('invalid_src_ip: ' || coalesce(p_event ->> 'src_ip', 'null'));
    END IF;
    IF p_event ? 'src_port' AND NOT dlq_is_port(p_event -> 'src_port') THEN
        v_errors := v_errors || ('invalid_src_port: ' || coalesce(p_event ->> 'src_port', 'null'));
    END IF;
    IF p_event ? 'dst_ip' AND NOT (CASE
            WHEN v_known.eventid IS NOT NULL AND v_eventid LIKE 'cowrie.direct-tcpip.%'
            THEN jsonb_typeof(p_event -> 'dst_ip') = 'string' AND btrim(p_event ->> 'dst_ip') <> ''
            ELSE dlq_is_ip(p_event -> 'dst_ip') END) THEN
        v_errors := v_errors || ('invalid_dst_ip: ' || coalesce(p_event ->> 'dst_ip', 'null'));
    END IF;
    IF p_event ? 'dst_port' AND NOT dlq_is_port(p_event -> 'dst_port') THEN
        v_errors := v_errors || ('invalid_dst_port: ' || coalesce(p_event ->> 'dst_port', 'null'));
    END IF;
    FOREACH v_field IN ARRAY ARRAY['input', 'username', 'password'] LOOP
        IF p_event ? v_field AND jsonb_typeof(p_event -> v_field) <> 'string' THEN
            v_errors := v_errors || ('invalid_' || v_field || ': ' || coalesce(p_event ->> v_field, 'null'));
        END IF;
    END LOOP;
    FOREACH v_field IN ARRAY ARRAY['shasum', 'sha256'] LOOP
        IF p_event ? v_field AND (jsonb_typeof(p_event -> v_field) <> 'string'
                                  OR (p_event ->> v_field) !~ '^[0-9a-fA-F]{64}$') THEN
            v_errors := v_errors || ('invalid_' || v_field || ': ' || coalesce(p_event ->> v_field, 'null'));
        END IF;
    END LOOP;
    IF v_known.eventid IS NOT NULL THEN
        FOREACH v_required IN ARRAY v_known.required_attributes LOOP
            IF NOT p_event ? v_required THEN
                v_errors := v_errors || ('missing_required_field: ' || v_required);
            END IF;
        END LOOP;
    END IF;
    RETURN v_errors;
END
$$;

-- A dead letter's record length, or NULL when its metadata holds none a byte count can be: a processor writes
-- metadata_json, so 1e30, 12.5 or text must not break the claims that read it (they skip such a row instead).
CREATE OR REPLACE FUNCTION dlq_record_bytes(p_metadata jsonb) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN (p_metadata ->> 'record_bytes') ~ '^[0-9]{1,15}$' THEN (p_metadata ->> 'record_bytes')::bigint END
$$;

-- The SHA-256 of a payload's text. STABLE, as convert_to() is: PostgreSQL inlines a SQL function only when it is
-- no stricter than its body, and inlined it costs 1.6 µs a call against 2.5-4.8 µs as a function call of its
-- own (benchmarks/README.md); it runs once per dead letter inserted (the insert trigger). No index, constraint or
-- generated column uses it, so STABLE is enough: raw_events.payload_checksum, a generated column, spells the same
-- checksum in immutable functions (migration 0025).

CREATE OR REPLACE FUNCTION dlq_payload_checksum(p_payload jsonb) RETURNS text
    LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$ SELECT encode(sha256(convert_to(p_payload::text, 'UTF8')), 'hex') $$;
