-- ojs-trio schema, version 2: a claim leaves the JSONB record alone.
--
-- Rewriting the record on every claim cost about a quarter of PostgreSQL's work
-- per claimed row (building a new JSONB value and logging it in full).  A claim
-- now sets only columns: state and worker_id (already there) and the three
-- below.  While `attempt` is not NULL, these columns hold the truth for the
-- job's state, attempt, started_at, and while active its worker_id and
-- lease_expires_at (and no scheduled_at); the record's copies of them are stale.
-- Every other write (ack_plain, and every transition applied by the engine's
-- rules) writes a complete record and sets the three columns back to NULL, so
-- rows written before this migration, whose columns are NULL, read as before.
-- Readers overlay the columns on the record (adapter.py, _job).

ALTER TABLE ojs_jobs
    ADD COLUMN attempt          integer,
    ADD COLUMN started_at       double precision,
    ADD COLUMN lease_expires_at double precision;
