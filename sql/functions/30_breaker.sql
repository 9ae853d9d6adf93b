-- The circuit breaker, per name, its state in dlq_circuit_breaker_state so it holds across processes.
-- closed --(failure_threshold consecutive failures)--> open --(timeout_seconds)--> half_open: exactly one
-- probe is let through; its success closes the breaker, its failure opens it again. Workers consult it for
-- every event (dlq_breaker_acquire) and report every outcome (dlq_breaker_record); an infrastructure failure
-- opens it at once (dlq_breaker_trip) and costs no event an attempt. Only security_admin configures it.

-- Names are short printable ASCII: they reach terminals, logs and the Dagster UI.
CREATE OR REPLACE FUNCTION dlq_breaker_check_name(p_name text) RETURNS void
    LANGUAGE plpgsql IMMUTABLE SET search_path = public, pg_temp
AS $$
BEGIN
    IF p_name IS NULL OR p_name !~ '^[!-~]([ -~]{0,62}[!-~])?$' THEN
        RAISE EXCEPTION 'a breaker name is 1 to 64 printable ASCII characters, got %', quote_literal(left(p_name, 80))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Creating a breaker with defaults is every processor's; setting its threshold or timeout is security_admin's
-- (dlq_breaker_configure). The bounds keep an hour-long timeout the longest wait a setting can cause.
CREATE OR REPLACE FUNCTION dlq_breaker_ensure(p_name text, p_threshold integer DEFAULT NULL,
                                              p_timeout_seconds integer DEFAULT NULL)
    RETURNS dlq_circuit_breaker_state
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    PERFORM dlq_breaker_check_name(p_name);
    IF p_threshold IS NOT NULL OR p_timeout_seconds IS NOT NULL THEN
        RAISE EXCEPTION 'dlq_breaker_ensure creates a breaker with its defaults; configure it with dlq_breaker_configure'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO dlq_circuit_breaker_state (breaker_name) VALUES (p_name) ON CONFLICT (breaker_name) DO NOTHING;
    SELECT * INTO v_row FROM dlq_circuit_breaker_state WHERE breaker_name = p_name;
    RETURN v_row;
END
$$;

CREATE OR REPLACE FUNCTION dlq_breaker_configure(p_name text, p_threshold integer DEFAULT NULL,
                                      p_timeout_seconds integer DEFAULT NULL)
    RETURNS dlq_circuit_breaker_state
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    PERFORM dlq_breaker_check_name(p_name);
    IF p_threshold IS NOT NULL AND p_threshold NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'failure threshold must be between 1 and 10000, got %', p_threshold
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_timeout_seconds IS NOT NULL AND p_timeout_seconds NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'timeout must be between 1 and 3600 seconds, got %', p_timeout_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO dlq_circuit_breaker_state (breaker_name, failure_threshold, timeout_seconds)
    VALUES (p_name, coalesce(p_threshold, 5), coalesce(p_timeout_seconds, 60))
    ON CONFLICT (breaker_name) DO UPDATE
        SET failure_threshold = coalesce(p_threshold, dlq_circuit_breaker_state.failure_threshold),
            timeout_seconds = coalesce(p_timeout_seconds, dlq_circuit_breaker_state.timeout_seconds),
            updated_at = now()
    RETURNING * INTO v_row;
    RETURN v_row;
END
$$;

-- May one more event go through? 'allow' (closed), 'probe' (this caller is the one half-open probe and must
-- report its outcome with the probe id), or 'deny'. A probe that never reports back is replaced after
-- timeout_seconds, so a crashed prober cannot wedge the breaker half-open.
CREATE OR REPLACE FUNCTION dlq_breaker_acquire(p_name text, OUT decision text, OUT probe uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    -- No row lock on the common paths (closed, or open and waiting): a lock here would be held for the
    -- caller's whole transaction and serialise every worker on the breaker row.
    SELECT * INTO v_row FROM dlq_circuit_breaker_state WHERE breaker_name = p_name;
    IF NOT FOUND THEN
        v_row := dlq_breaker_ensure(p_name);
    END IF;
    IF v_row.state = 'closed' THEN
        decision := 'allow';
        RETURN;
    END IF;
    IF v_row.next_attempt_time <= now() THEN
        -- Due for a probe (or the last probe was lost): the first caller's UPDATE wins; the row lock makes a
        -- concurrent caller re-check the condition against the new row and find it no longer due.
        UPDATE dlq_circuit_breaker_state
           SET state = 'half_open', half_open_probe = gen_random_uuid(),
               next_attempt_time = now() + make_interval(secs => timeout_seconds), updated_at = now()
         WHERE breaker_name = p_name AND state IN ('open', 'half_open') AND next_attempt_time <= now()
        RETURNING half_open_probe INTO probe;
        IF FOUND THEN
            decision := 'probe';
            RETURN;
        END IF;
    END IF;
    decision := 'deny';
END
$$;

-- Outcome counts are a batch's: at most the largest claim (100000) each.
CREATE OR REPLACE FUNCTION dlq_breaker_record(p_name text, p_successes integer, p_failures integer,
                                              p_probe uuid DEFAULT NULL)
    RETURNS dlq_circuit_breaker_state
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    IF p_successes NOT BETWEEN 0 AND 100000 OR p_failures NOT BETWEEN 0 AND 100000 THEN
        RAISE EXCEPTION 'outcome counts must be between 0 and 100000, got % and %', p_successes, p_failures
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_row FROM dlq_circuit_breaker_state WHERE breaker_name = p_name;
    IF NOT FOUND THEN
        v_row := dlq_breaker_ensure(p_name);
    END IF;
    IF v_row.state = 'closed' AND p_failures = 0 AND v_row.failure_count = 0 THEN
        RETURN v_row;  -- the common case changes nothing: take no row lock
    END IF;
    SELECT * INTO v_row FROM dlq_circuit_breaker_state WHERE breaker_name = p_name FOR UPDATE;
    IF v_row.state = 'half_open' THEN
        IF p_probe IS NULL OR p_probe IS DISTINCT FROM v_row.half_open_probe THEN
            RETURN v_row;  -- not the probe: its result does not decide (it should not have run)
        END IF;
        IF p_failures > 0 THEN
            UPDATE dlq_circuit_breaker_state
               SET state = 'open', failure_count = least(failure_count + p_failures, 1000000),
                   last_failure_time = now(), opened_at = now(),
                   next_attempt_time = now() + make_interval(secs => timeout_seconds),
                   half_open_probe = NULL, updated_at = now()
             WHERE breaker_name = p_name RETURNING * INTO v_row;
        ELSE
            UPDATE dlq_circuit_breaker_state
               SET state = 'closed', failure_count = 0, next_attempt_time = NULL, half_open_probe = NULL,
                   opened_at = NULL, updated_at = now()
             WHERE breaker_name = p_name RETURNING * INTO v_row;
        END IF;
        RETURN v_row;
    END IF;
    IF v_row.state = 'open' THEN
        RETURN v_row;  -- late reports from work started before it opened change nothing
    END IF;
    UPDATE dlq_circuit_breaker_state
       SET failure_count = CASE WHEN p_successes > 0 THEN p_failures
                                ELSE least(failure_count + p_failures, 1000000) END,
           last_failure_time = CASE WHEN p_failures > 0 THEN now() ELSE last_failure_time END,
           updated_at = now()
     WHERE breaker_name = p_name RETURNING * INTO v_row;
    IF v_row.failure_count >= v_row.failure_threshold THEN
        UPDATE dlq_circuit_breaker_state
           SET state = 'open', opened_at = now(), next_attempt_time = now() + make_interval(secs => timeout_seconds),
               updated_at = now()
         WHERE breaker_name = p_name RETURNING * INTO v_row;
    END IF;
    RETURN v_row;
END
$$;

-- An infrastructure failure (the target refused a write, the connection or the disk failed, a timeout): the
-- breaker opens at once, whatever its count, for its timeout. A half-open probe that met one opens it too.
-- Already open, it stays as it is: the timeout is not extended by every worker that meets the same failure.
-- Only a breaker that exists (a worker ensures its own before it claims): no open breaker under a made-up name.
CREATE OR REPLACE FUNCTION dlq_breaker_trip(p_name text, p_probe uuid DEFAULT NULL) RETURNS dlq_circuit_breaker_state
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    UPDATE dlq_circuit_breaker_state
       SET state = 'open', failure_count = greatest(failure_count, failure_threshold), last_failure_time = now(),
           opened_at = now(), next_attempt_time = now() + make_interval(secs => timeout_seconds),
           half_open_probe = NULL, updated_at = now()
     WHERE breaker_name = p_name
       AND (state = 'closed' OR (state = 'half_open' AND p_probe IS NOT DISTINCT FROM half_open_probe))
    RETURNING * INTO v_row;
    IF NOT FOUND THEN
        SELECT * INTO v_row FROM dlq_circuit_breaker_state WHERE breaker_name = p_name;
    END IF;
    RETURN v_row;
END
$$;

-- Manual control: open (stays open for timeout_seconds, then half-opens as usual), close, reset (close and
-- forget the failure count and times).
CREATE OR REPLACE FUNCTION dlq_breaker_set(p_name text, p_action text) RETURNS dlq_circuit_breaker_state
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_row dlq_circuit_breaker_state;
BEGIN
    IF p_action NOT IN ('open', 'close', 'reset') THEN
        RAISE EXCEPTION 'breaker action must be open, close or reset, got %', p_action
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM dlq_breaker_ensure(p_name);
    UPDATE dlq_circuit_breaker_state
       SET state = CASE p_action WHEN 'open' THEN 'open' ELSE 'closed' END,
           opened_at = CASE p_action WHEN 'open' THEN now() END,
           next_attempt_time = CASE p_action WHEN 'open' THEN now() + make_interval(secs => timeout_seconds) END,
           failure_count = CASE p_action WHEN 'reset' THEN 0 WHEN 'close' THEN 0 ELSE failure_count END,
           last_failure_time = CASE p_action WHEN 'reset' THEN NULL ELSE last_failure_time END,
           half_open_probe = NULL,
           updated_at = now()
     WHERE breaker_name = p_name RETURNING * INTO v_row;
    RETURN v_row;
END
$$;

-- The design's name: true when work may proceed (closed, or this caller got the half-open probe).
CREATE OR REPLACE FUNCTION check_circuit_breaker(breaker_name text) RETURNS boolean
    LANGUAGE sql SET search_path = public, pg_temp
AS $$ SELECT (dlq_breaker_acquire(breaker_name)).decision <> 'deny' $$;

-- The design's name: one failure, reported outside a batch.
CREATE OR REPLACE FUNCTION record_circuit_breaker_failure(p_breaker_name text) RETURNS void
    LANGUAGE sql SET search_path = public, pg_temp
AS $$ SELECT dlq_breaker_record(p_breaker_name, 0, 1, (SELECT half_open_probe FROM dlq_circuit_breaker_state
                                                            WHERE breaker_name = p_breaker_name)) $$;
