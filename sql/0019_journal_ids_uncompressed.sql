-- 0019: a batch's journalled ids stored out of line but not compressed.
--
-- A 1,000-event batch journals 8 KB of ids (dlq_journal_batch), which the completion reads back and deletes
-- within the same second: compressing them (pglz, 0.7% of the server's CPU in a profile of the worker) and
-- decompressing them cost more than it saved. Journal, read back and delete of 1,000 ids, alone: 2.1 ms with
-- the default storage, 0.9 ms with EXTERNAL (median of 60; benchmarks/README.md, session 5). Rows already there
-- keep their form; both read the same.
ALTER TABLE dlq_batch_leases ALTER COLUMN event_ids SET STORAGE EXTERNAL;
