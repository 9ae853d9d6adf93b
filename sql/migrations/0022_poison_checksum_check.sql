-- The poison table checks the checksum's shape the way dead_letter_events does: by length and character set.
--
-- PostgreSQL re-checks every CHECK constraint on every UPDATE, and a regular expression there is the largest
-- single cost of the writes in a profile of the worker. dlq_poison_events copied the constraint from
-- dead_letter_events (CREATE TABLE ... LIKE ... INCLUDING CONSTRAINTS) in the chain the baseline squashes, with
-- the regular expression; this gives both tables the same rule in every database.
ALTER TABLE dlq_poison_events DROP CONSTRAINT dead_letter_events_checksum_is_sha256;

ALTER TABLE dlq_poison_events ADD CONSTRAINT dead_letter_events_checksum_is_sha256
    CHECK (length(payload_checksum) = 64 AND ltrim(payload_checksum, '0123456789abcdef') = '');
