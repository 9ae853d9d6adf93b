-- 0020: raw_events says which events are partial.
--
-- A record cut right after a complete value can be closed into a valid Cowrie event (repair strategy
-- truncation_closed), but nothing proves the cut took only closing brackets: such an event is stored, and
-- marked, never passed off as whole. Analysts filter on the column; the partial index keeps finding the few
-- marked rows cheap however large the table grows. A constant default adds the column without rewriting the table.
ALTER TABLE raw_events ADD COLUMN partial boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN raw_events.partial IS
    'True when the event was rebuilt from a cut record by closing its brackets: later attributes may be missing.';
CREATE INDEX ix_raw_events_partial ON raw_events (event_timestamp) WHERE partial;
