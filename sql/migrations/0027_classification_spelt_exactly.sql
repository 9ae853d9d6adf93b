-- 'malicious' is the one classification every exclusion names: claims, row security, the claim index, health. A
-- value that means it but is spelt otherwise ('Malicious', ' malicious') escaped them all: such an event was
-- claimed and its payload written where readers see it. Rows holding one are classified 'malicious' exactly (hidden,
-- as meant), and the tables refuse any other spelling from now on.
UPDATE dead_letter_events SET classification = 'malicious'
 WHERE classification <> 'malicious' AND lower(btrim(classification, E' \t\r\n')) = 'malicious';

UPDATE dlq_poison_events SET classification = 'malicious'
 WHERE classification <> 'malicious' AND lower(btrim(classification, E' \t\r\n')) = 'malicious';

ALTER TABLE dead_letter_events ADD CONSTRAINT dead_letter_events_malicious_spelt_exactly
    CHECK (classification = 'malicious' OR lower(btrim(classification, E' \t\r\n')) <> 'malicious');

ALTER TABLE dlq_poison_events ADD CONSTRAINT dlq_poison_events_malicious_spelt_exactly
    CHECK (classification = 'malicious' OR lower(btrim(classification, E' \t\r\n')) <> 'malicious');
