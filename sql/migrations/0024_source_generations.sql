-- What ingest knows of each log file it has read, to tell a file that grew from one truncated in place and
-- written again (logrotate's copytruncate, `> cowrie.json`, a cut back to an earlier size): the second reuses byte
-- offsets, so its positions must not be keyed like the first's. A file whose first bytes, or whose bytes just before
-- the end seen last, differ from the ones read then, or which is smaller than it was, holds a new generation of
-- content: its rows are keyed with source_inode '<inode>.<generation>' (generation 1 keeps the bare inode, so rows
-- written before this table stay keyed alike).
CREATE TABLE dlq_source_files (
    source       varchar(512) NOT NULL,
    inode        varchar(64)  NOT NULL,
    generation   integer      NOT NULL DEFAULT 1,
    head         bytea        NOT NULL,
    tail         bytea        NOT NULL DEFAULT '',
    size         bigint       NOT NULL,
    generation_started_at timestamptz NOT NULL DEFAULT now(),
    seen_at      timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT dlq_source_files_pkey PRIMARY KEY (source, inode),
    CONSTRAINT dlq_source_files_generation_positive CHECK (generation >= 1),
    CONSTRAINT dlq_source_files_head_bounded CHECK (length(head) <= 4096),
    CONSTRAINT dlq_source_files_tail_bounded CHECK (length(tail) <= 4096),
    CONSTRAINT dlq_source_files_size_nonnegative CHECK (size >= 0)
);

COMMENT ON TABLE dlq_source_files IS
    'Log files ingest has read: the first bytes and the size of the current generation of each (source, inode).';
COMMENT ON COLUMN dlq_source_files.head IS 'The file''s first bytes as stored on disk (up to 4096), as last read.';
COMMENT ON COLUMN dlq_source_files.tail IS 'The bytes just before size (up to 4096), as last read: an append keeps them.';
COMMENT ON COLUMN dlq_source_files.size IS 'The file''s size on disk when last opened: a smaller one was truncated.';

GRANT SELECT ON dlq_source_files TO dlq_reader, security_admin;
