-- ojs-trio schema, version 3: the plain ack leaves the JSONB record alone too.
--
-- Rewriting the record was nearly half of ack_plain's executor time (each "-" or
-- "||" on a JSONB value copies all of it).  As migration 0002 did for the claim,
-- the plain ack now sets columns only, and readers lay them over the record
-- (adapter.py, _job).  A row whose `attempt` is set and whose state is
-- 'completed' was completed that way: the record is the job as enqueued (or as
-- last written in full), and the columns hold the truth for state, attempt,
-- started_at, the worker that held it (worker_id), completed_at (finished_at)
-- and the result (this column: a one-element JSON array holding it, or NULL
-- without one; a bare JSON null would read back as no result);
-- the record's error, lease and schedule are cleared when read.  Every other
-- write still writes a complete record and sets these columns back to NULL.

ALTER TABLE ojs_jobs ADD COLUMN ack_result jsonb;
