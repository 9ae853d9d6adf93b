-- 'malicious' is the one classification every exclusion names: claims, row security, the claim index, health. A
-- value that means it but is spelt otherwise ('Malicious', ' malicious', 'malicious' with a no-break or zero-width
-- space, a soft hyphen or a byte-order mark in it) escapes them all: such an event would be claimed and its payload
-- written where readers see it. Rows holding one are classified 'malicious' exactly (hidden, as meant), and the
-- tables refuse any other spelling. What is read: the value lower-cased, without Unicode's spaces (Zs), line and
-- paragraph separators, ASCII and C1 blanks, and the invisible format characters (soft hyphen, zero-width and
-- directional marks, word joiner, byte-order mark): one translate(), cheap on every update. Look-alike letters of
-- other scripts are not folded.
DO $$
DECLARE
    v_read  CONSTANT text := format('lower(translate(classification, %L, %L))', U&' \0009\000A\000B\000C\000D\0085\00A0\00AD\1680\180E\2000\2001\2002\2003\2004\2005\2006\2007\2008\2009\200A\200B\200C\200D\200E\200F\2028\2029\202A\202B\202C\202D\202E\202F\205F\2060\2061\2062\2063\2064\3000\FEFF', '');
    v_table text;
BEGIN
    FOREACH v_table IN ARRAY ARRAY['dead_letter_events', 'dlq_poison_events'] LOOP
        EXECUTE format('UPDATE %I SET classification = %L WHERE classification <> %L AND %s = %L',
                       v_table, 'malicious', 'malicious', v_read, 'malicious');
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (classification = %L OR %s <> %L)',
                       v_table, v_table || '_malicious_spelt_exactly', 'malicious', v_read, 'malicious');
    END LOOP;
END
$$;
