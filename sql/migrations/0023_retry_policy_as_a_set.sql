-- dlq_retry_policy returns a set of at most one row, so PostgreSQL can inline it where dlq_complete_batch looks
-- a policy up for each failed row (sql/functions/50_completion.sql). A function's return type cannot change in
-- place: the old one goes here, and the function files, applied after every migration, create the new one.
DROP FUNCTION IF EXISTS dlq_retry_policy(text, text);
