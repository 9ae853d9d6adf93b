-- Who may call each function and read each view. A function this file does not revoke from PUBLIC keeps
-- PostgreSQL's default: any role may execute it.

GRANT EXECUTE ON FUNCTION check_circuit_breaker(breaker_name text) TO dlq_processor_role;

REVOKE ALL ON FUNCTION cleanup_resolved_dlq_events_enhanced(p_older_than_days integer, p_batch_size integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_breaker_acquire(p_name text, OUT decision text, OUT probe uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_breaker_acquire(p_name text, OUT decision text, OUT probe uuid) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_breaker_check_name(p_name text) FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_breaker_configure(p_name text, p_threshold integer, p_timeout_seconds integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_breaker_configure(p_name text, p_threshold integer, p_timeout_seconds integer) TO security_admin;

REVOKE ALL ON FUNCTION dlq_breaker_ensure(p_name text, p_threshold integer, p_timeout_seconds integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_breaker_ensure(p_name text, p_threshold integer, p_timeout_seconds integer) TO dlq_processor_role;
GRANT EXECUTE ON FUNCTION dlq_breaker_ensure(p_name text, p_threshold integer, p_timeout_seconds integer) TO security_admin;

REVOKE ALL ON FUNCTION dlq_breaker_record(p_name text, p_successes integer, p_failures integer, p_probe uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_breaker_record(p_name text, p_successes integer, p_failures integer, p_probe uuid) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_breaker_set(p_name text, p_action text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_breaker_set(p_name text, p_action text) TO security_admin;

REVOKE ALL ON FUNCTION dlq_breaker_trip(p_name text, p_probe uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_breaker_trip(p_name text, p_probe uuid) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_claim_batch(p_lease uuid, p_limit integer, p_priority_max integer, p_reason text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_claim_batch(p_lease uuid, p_limit integer, p_priority_max integer, p_reason text) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_claim_events(p_limit integer, p_lease_seconds integer, p_priority_max integer, p_reason text, p_worker text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_claim_events(p_limit integer, p_lease_seconds integer, p_priority_max integer, p_reason text, p_worker text) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_claim_fragment_chains(p_lease uuid, p_ids bigint[], p_window_bytes bigint, p_lease_seconds integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_claim_fragment_chains(p_lease uuid, p_ids bigint[], p_window_bytes bigint, p_lease_seconds integer) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_complete_batch(p_lease uuid, p_ids bigint[], p_outcomes text[], p_methods text[], p_error_classes text[], p_messages text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_complete_batch(p_lease uuid, p_ids bigint[], p_outcomes text[], p_methods text[], p_error_classes text[], p_messages text[]) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_check_lease_seconds(p_lease_seconds integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_check_lease_seconds(p_lease_seconds integer) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_check_priority_max(p_priority_max integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_check_priority_max(p_priority_max integer) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_due_events_sql(p_columns text, p_free text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_due_events_sql(p_columns text, p_free text) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_ensure_partitions(p_from timestamp with time zone, p_months_ahead integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_event_counts_fold() FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_event_counts_sql(p_source text) FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_forget_batch(p_lease uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_forget_batch(p_lease uuid) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_heartbeat(p_lease uuid, p_lease_seconds integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_heartbeat(p_lease uuid, p_lease_seconds integer) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_journal_batch(p_lease uuid, p_ids bigint[], p_worker text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_journal_batch(p_lease uuid, p_ids bigint[], p_worker text) TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_recount_events() FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_redrive(p_ids bigint[], p_reason text, p_from timestamp with time zone, p_to timestamp with time zone, p_limit integer, p_max_redrives integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_redrive_candidates(p_ids bigint[], p_reason text, p_from timestamp with time zone, p_to timestamp with time zone, p_max_redrives integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_release_dead_batches() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_release_dead_batches() TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_release_reviewed(p_id bigint, p_note text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_release_reviewed(p_id bigint, p_note text) TO security_admin;

REVOKE ALL ON FUNCTION dlq_release_stale_leases() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_release_stale_leases() TO dlq_processor_role;

REVOKE ALL ON FUNCTION dlq_retention_drop_partitions(p_older_than_days integer, p_dry_run boolean) FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_retention_drop_partitions_uncounted(p_older_than_days integer, p_dry_run boolean) FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_retention_partition_blockers(p_partition regclass, p_cutoff timestamp with time zone, OUT total_rows bigint, OUT why text) FROM PUBLIC;

REVOKE ALL ON FUNCTION dlq_retention_preview(p_older_than_days integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlq_retention_preview(p_older_than_days integer) TO dlq_reader;
GRANT EXECUTE ON FUNCTION dlq_retention_preview(p_older_than_days integer) TO security_admin;

REVOKE ALL ON FUNCTION process_dlq_events_enhanced(p_limit integer, p_reason_filter text, p_priority_filter integer, p_circuit_breaker_name text, p_pause_every integer, p_pause_seconds double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION process_dlq_events_enhanced(p_limit integer, p_reason_filter text, p_priority_filter integer, p_circuit_breaker_name text, p_pause_every integer, p_pause_seconds double precision) TO dlq_processor_role;

GRANT EXECUTE ON FUNCTION record_circuit_breaker_failure(p_breaker_name text) TO dlq_processor_role;

REVOKE ALL ON FUNCTION record_dlq_processing_failure(p_dlq_id bigint, p_error_type text, p_error_message text) FROM PUBLIC;

GRANT SELECT ON dlq_health TO dlq_reader;
GRANT SELECT ON dlq_health TO security_admin;
GRANT SELECT ON dlq_health TO dlq_processor_role;

GRANT SELECT ON dlq_partitions TO dlq_reader;
GRANT SELECT ON dlq_partitions TO security_admin;
GRANT SELECT ON dlq_partitions TO dlq_processor_role;
