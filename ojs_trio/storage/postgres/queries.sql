-- Named queries of the PostgreSQL adapter.  Each block starts with "-- name: x".
-- Times are epoch seconds (double precision), passed in by the engine.

-- name: configure_session
-- Run once on every pooled connection.  A job table churns faster than autovacuum's
-- ANALYZE can follow, so the planner's statistics are always stale: on a fresh or
-- bloated ojs_jobs_live it estimated thousands of rows for `id = ANY(<10 ids>)` and
-- seq-scanned the partition for every ack batch, and it answered the claim with a
-- bitmap scan, which revisits every dead index entry and never marks one dead (an
-- ordered index scan stops after LIMIT rows and kills what it passes).  Every query
-- of this adapter is written for an index, so we tell the planner to use one.
-- The same stale estimates priced a one-row UPDATE on a 1M-row table above
-- jit_above_cost: JIT compilation then took 137 ms for a 0.25 ms statement.  No
-- query here runs long enough to win from JIT (docs/performance.md, "Planner
-- settings").  Joins likewise: an enqueue checks its ids for clashes by joining
-- them to ojs_jobs, and with the table's size unknown the planner hashed the whole
-- primary key (a 60k-row index scan, 18 ms) to look up 100 ids.  Every join here
-- has an index on its inner side, so nested loops are always the right plan.
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SET enable_hashjoin = off;
SET enable_mergejoin = off;
SET jit = off

-- name: insert_job
INSERT INTO ojs_jobs (id, finished, queue, state, priority, run_at, lease_until, expires_at,
                      unique_key, workflow_id, dead_letter, worker_id, created_at, finished_at,
                      record)
VALUES (%(id)s, %(finished)s, %(queue)s, %(state)s, %(priority)s, %(run_at)s, %(lease_until)s,
        %(expires_at)s, %(unique_key)s, %(workflow_id)s, %(dead_letter)s, %(worker_id)s,
        %(created_at)s, %(finished_at)s, %(record)s)

-- name: insert_jobs
-- One JSON array of row objects: a single parameter, dumped by one json.dumps
-- (a jsonb[] parameter is escaped element by element in Python, which is slow).
INSERT INTO ojs_jobs (id, finished, queue, state, priority, run_at, lease_until, expires_at,
                      unique_key, workflow_id, dead_letter, worker_id, created_at, finished_at,
                      record)
SELECT id, finished, queue, state, priority, run_at, lease_until, expires_at, unique_key,
       workflow_id, dead_letter, worker_id, created_at, finished_at, record
  FROM jsonb_to_recordset(%s::jsonb) AS x(
       id uuid, finished boolean, queue text, state text, priority integer,
       run_at double precision, lease_until double precision, expires_at double precision,
       unique_key text, workflow_id uuid, dead_letter boolean, worker_id text,
       created_at double precision, finished_at double precision, record jsonb)

-- name: enqueue_plain
-- Enqueue calls without unique policies or queue limits, in one autocommitted
-- statement: per call (column "call"), either every job is inserted or, if one of
-- its ids is taken, none is and the taken id is returned.  Queues are created and
-- one NOTIFY is sent for the inserted available jobs.
WITH input AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS x(
        call integer, id uuid, finished boolean, queue text, state text, priority integer,
        run_at double precision, lease_until double precision, expires_at double precision,
        unique_key text, workflow_id uuid, dead_letter boolean, worker_id text,
        created_at double precision, finished_at double precision, record jsonb)
), clash AS (
    SELECT DISTINCT ON (i.call) i.call, i.id
      FROM input i JOIN ojs_jobs j ON j.id = i.id
     ORDER BY i.call
), good AS (
    SELECT * FROM input WHERE call NOT IN (SELECT call FROM clash)
), queues AS (
    INSERT INTO ojs_queues (name, created_at)
    SELECT DISTINCT queue, %(now)s::double precision FROM good
    ON CONFLICT (name) DO NOTHING
), inserted AS (
    INSERT INTO ojs_jobs (id, finished, queue, state, priority, run_at, lease_until,
                          expires_at, unique_key, workflow_id, dead_letter, worker_id,
                          created_at, finished_at, record)
    SELECT id, finished, queue, state, priority, run_at, lease_until, expires_at, unique_key,
           workflow_id, dead_letter, worker_id, created_at, finished_at, record
      FROM good
    RETURNING queue, state
), notified AS (
    SELECT pg_notify('ojs_jobs', CASE WHEN length(p) < %(limit)s THEN p ELSE '' END)
      FROM (SELECT string_agg(DISTINCT queue, ',') AS p
              FROM inserted WHERE state = 'available') AS s
     WHERE p IS NOT NULL
)
SELECT call, id::text FROM clash
UNION ALL
SELECT -1, NULL FROM notified

-- name: ensure_queues
INSERT INTO ojs_queues (name, created_at)
SELECT unnest(%s::text[]), %s ON CONFLICT (name) DO NOTHING

-- name: job_exists
-- The primary key is (id, finished): an id clash with a finished job is checked here.
SELECT id FROM ojs_jobs WHERE id = ANY(%s::uuid[])

-- name: update_job
UPDATE ojs_jobs
   SET finished = %(finished)s, state = %(state)s, priority = %(priority)s, run_at = %(run_at)s,
       lease_until = %(lease_until)s, expires_at = %(expires_at)s, dead_letter = %(dead_letter)s,
       worker_id = %(worker_id)s, finished_at = %(finished_at)s, record = %(record)s,
       attempt = NULL, started_at = NULL, lease_expires_at = NULL, ack_result = NULL
 WHERE id = %(id)s

-- name: ensure_queue
INSERT INTO ojs_queues (name, created_at) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING

-- name: set_queue_limits
UPDATE ojs_queues
   SET rate_limit = COALESCE(%(rate_limit)s, rate_limit),
       concurrency = COALESCE(%(concurrency)s, concurrency)
 WHERE name = %(name)s

-- name: get_job
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result FROM ojs_jobs WHERE id = %s

-- name: lock_job
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result FROM ojs_jobs WHERE id = %s FOR UPDATE

-- name: lock_jobs
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result FROM ojs_jobs WHERE id = ANY(%s::uuid[]) ORDER BY id FOR UPDATE

-- name: lock_unique
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result FROM ojs_jobs WHERE unique_key = %s ORDER BY created_at FOR UPDATE

-- name: queues_for_claim
SELECT name, paused, rate_limit, concurrency FROM ojs_queues WHERE name = ANY(%s)

-- name: claim_plain
-- One autocommitted statement that claims up to len(slots) jobs of one queue and
-- marks them active; the n-th job in delivery order goes to slot n.  The changes
-- are exactly engine.lifecycle.claim's (tests/test_pg_sql_transitions.py compares
-- the two on every kind of job): state, attempt + 1, started_at, the worker and
-- lease, scheduled_at cleared.  They go to columns only (migration 0002): the
-- record is left as it is and readers overlay the columns on it, because
-- rebuilding the JSONB record was about a quarter of the statement's cost.
-- A paused queue yields no rows; a queue with a rate or concurrency limit yields
-- one all-NULL row and nothing is claimed: the caller then takes the
-- transactional path (claim_available), which counts the budget first.  Slots
-- are numbered 1..N, so the n-th job's slot is read by array subscript: a join of
-- the picked jobs to the slots on n was a nested loop over both (1.6M
-- comparisons, 380 ms for 1,270 slots).
-- The claim commits without waiting for its WAL to reach disk (set_config(...,
-- true) lasts to the end of this statement's own transaction, commit included).
-- A claim lost in a database crash puts the job back to available, so it is
-- delivered again: at-least-once holds, and enqueues and acks still wait for the
-- flush (which takes every earlier claim with it).  Waiting, a fetch stalled for
-- as long as any fsync took: 60 ms at times on the benchmark VM
-- (docs/performance.md, "Windows, claims without the flush, ...").
WITH settings AS (
    SELECT paused, rate_limit IS NOT NULL OR concurrency IS NOT NULL AS limited
      FROM ojs_queues WHERE name = %(queue)s
), slots AS (
    -- A CTE with a volatile call is evaluated once and in full: slots always is.
    SELECT count(*) AS total,
           array_agg(s.worker_id ORDER BY s.n) AS worker_ids,
           array_agg(s.visibility_ms ORDER BY s.n) AS visibility_ms,
           set_config('synchronous_commit', 'off', true) AS commit_mode
      FROM jsonb_to_recordset(%(slots)s::jsonb)
        AS s(n bigint, worker_id text, visibility_ms bigint)
), picked AS (
    SELECT p.id, p.visibility_ms, p.timeout_ms,
           row_number() OVER (ORDER BY p.priority DESC, p.id) AS n
      FROM (SELECT id, priority,
                   (record->>'visibility_timeout_ms')::bigint AS visibility_ms,
                   (record->'_private'->>'timeout_ms')::bigint AS timeout_ms
              FROM ojs_jobs
             WHERE NOT finished AND queue = %(queue)s AND state = 'available'
               AND (expires_at IS NULL OR expires_at > %(now)s)
               AND NOT EXISTS (SELECT 1 FROM settings WHERE paused OR limited)
             ORDER BY priority DESC, id
             LIMIT (SELECT total FROM slots)
               FOR UPDATE SKIP LOCKED) AS p
), leased AS (
    -- lifecycle.claim: ms = request's visibility or the job's or the default.
    SELECT p.id, p.n, s.worker_ids[p.n] AS worker_id, p.timeout_ms,
           %(now)s::float8 + coalesce(nullif(s.visibility_ms[p.n], 0),
                                      nullif(p.visibility_ms, 0),
                                      %(default_ms)s)::float8 / 1000.0::float8 AS lease
      FROM picked AS p CROSS JOIN slots AS s
), claimed AS (
    UPDATE ojs_jobs AS j
       SET state = 'active', run_at = NULL, worker_id = l.worker_id,
           -- the lease column also honours the execution deadline (timeout_ms)
           lease_until = least(l.lease, %(now)s::float8 + l.timeout_ms::float8 / 1000.0::float8),
           attempt = coalesce(j.attempt, (j.record->>'attempt')::integer) + 1,
           started_at = %(now)s::float8,
           lease_expires_at = l.lease
      FROM leased AS l
     WHERE j.id = l.id AND NOT j.finished
 RETURNING l.n, j.record, j.state, j.worker_id, j.attempt, j.started_at, j.lease_expires_at,
          j.finished_at, j.ack_result
)
SELECT n, record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result
  FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM settings WHERE limited AND NOT paused

-- name: claim_available
-- The claim of a queue with limits, inside the transaction that counted its budget.
-- Jobs past their TTL are left to the reaper, which discards and reports them.
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result FROM ojs_jobs
 WHERE NOT finished AND queue = %s AND state = 'available'
   AND (expires_at IS NULL OR expires_at > %s)
 ORDER BY priority DESC, id
 LIMIT %s
 FOR UPDATE SKIP LOCKED

-- name: count_active
SELECT count(*) FROM ojs_jobs WHERE NOT finished AND queue = %s AND state = 'active'

-- name: recent_starts
SELECT count(*) FROM ojs_queue_starts WHERE queue = %s AND started_at > %s

-- name: record_starts
INSERT INTO ojs_queue_starts (queue, started_at)
SELECT %s, %s FROM generate_series(1, %s)

-- name: ack_plain
-- lifecycle.ack for many jobs in one autocommitted statement, for jobs outside
-- workflows (tests/test_pg_sql_transitions.py compares it with the engine's rule): state
-- completed, completed_at, the result if any, the latest error and the lease
-- cleared; the row moves to ojs_jobs_done.  Columns only (migration 0003): the
-- record is left as it is, `attempt` and `started_at` keep the attempt that
-- completed (from the record if a full write had put them back there),
-- `worker_id` the worker that held it, `finished_at` the completion time and
-- `ack_result` the result; readers lay them over the record.  A job that is not
-- active, belongs to a workflow or is held by another worker is left alone; the
-- caller sends those down the general path, which raises the right error.  Ids
-- are distinct.
WITH acks AS (
    SELECT * FROM jsonb_to_recordset(%(acks)s::jsonb)
        AS a(id uuid, worker_id text, now double precision, has_result boolean, result jsonb)
)
UPDATE ojs_jobs AS j
   SET finished = true, state = 'completed', finished_at = a.now, run_at = NULL,
       lease_until = NULL, dead_letter = false, lease_expires_at = NULL,
       attempt = coalesce(j.attempt, (j.record->>'attempt')::integer),
       started_at = CASE WHEN j.attempt IS NOT NULL THEN j.started_at
                         ELSE (j.record->'_private'->>'started_at')::double precision END,
       -- a JSON null result is SQL NULL here: the array tells it from no result
       ack_result = CASE WHEN a.has_result THEN jsonb_build_array(a.result) END
  FROM acks AS a
 -- The ids twice: "= ANY" makes every plan look the jobs up by key.  On a
 -- never-analyzed table the planner otherwise read every active job (through
 -- the partial index ojs_jobs_leases, or the whole live partition) and matched
 -- the acks by filter.  "(…) IS TRUE" keeps it off the partial index.
 WHERE j.id = a.id AND j.id = ANY(%(ids)s::uuid[])
   AND NOT j.finished AND (j.state = 'active') IS TRUE
   AND j.workflow_id IS NULL
   AND (a.worker_id IS NULL OR j.worker_id IS NULL OR j.worker_id = a.worker_id)
RETURNING j.record, j.state, j.worker_id, j.attempt, j.started_at, j.lease_expires_at,
          j.finished_at, j.ack_result

-- name: update_jobs
-- update_job for many rows at once (one JSON array of row objects; ids distinct).
UPDATE ojs_jobs AS j
   SET finished = u.finished, state = u.state, priority = u.priority, run_at = u.run_at,
       lease_until = u.lease_until, expires_at = u.expires_at, dead_letter = u.dead_letter,
       worker_id = u.worker_id, finished_at = u.finished_at, record = u.record,
       attempt = NULL, started_at = NULL, lease_expires_at = NULL, ack_result = NULL
  FROM jsonb_to_recordset(%s::jsonb) AS u(
       id uuid, finished boolean, state text, priority integer, run_at double precision,
       lease_until double precision, expires_at double precision, dead_letter boolean,
       worker_id text, finished_at double precision, record jsonb)
 WHERE j.id = u.id

-- name: prune_starts
DELETE FROM ojs_queue_starts WHERE started_at < %s

-- name: due_jobs
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result FROM ojs_jobs
 WHERE NOT finished AND state IN ('scheduled', 'retryable') AND run_at <= %s
 ORDER BY run_at
 LIMIT %s
 FOR UPDATE SKIP LOCKED

-- name: expired_leases
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result FROM ojs_jobs
 WHERE NOT finished AND state = 'active' AND lease_until <= %s
 ORDER BY lease_until
 LIMIT %s
 FOR UPDATE SKIP LOCKED

-- name: expired_ttl
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result FROM ojs_jobs
 WHERE NOT finished AND expires_at <= %s
   AND state IN ('available', 'scheduled', 'retryable', 'pending')
 ORDER BY expires_at
 LIMIT %s
 FOR UPDATE SKIP LOCKED

-- name: prune
DELETE FROM ojs_jobs WHERE finished AND id IN (
    SELECT id FROM ojs_jobs
     WHERE finished AND finished_at IS NOT NULL
       AND ((NOT dead_letter AND finished_at < %(before)s::double precision)
            OR (dead_letter AND finished_at < %(dead_before)s::double precision))
     LIMIT %(limit)s
     FOR UPDATE SKIP LOCKED)

-- name: next_due
SELECT min(run_at) FROM ojs_jobs WHERE NOT finished AND state IN ('scheduled', 'retryable')

-- name: next_reap
SELECT least(
    (SELECT min(lease_until) FROM ojs_jobs WHERE NOT finished AND state = 'active'),
    (SELECT min(expires_at) FROM ojs_jobs
      WHERE NOT finished AND expires_at IS NOT NULL
        AND state IN ('available', 'scheduled', 'retryable', 'pending')))

-- name: list_dead_letter
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result,
       count(*) OVER () FROM ojs_jobs
 WHERE finished AND dead_letter AND (%(queue)s::text IS NULL OR queue = %(queue)s)
 ORDER BY id
 LIMIT %(limit)s OFFSET %(offset)s

-- name: count_dead_letter
SELECT count(*) FROM ojs_jobs
 WHERE finished AND dead_letter AND (%(queue)s::text IS NULL OR queue = %(queue)s)

-- name: lock_dead_letter
SELECT record, state, worker_id, attempt, started_at, lease_expires_at, finished_at, ack_result FROM ojs_jobs WHERE id = %s AND finished AND dead_letter FOR UPDATE

-- name: delete_job
DELETE FROM ojs_jobs WHERE id = %s

-- name: list_queues
SELECT q.name, q.paused, q.created_at, q.rate_limit, q.concurrency,
       COALESCE(jsonb_object_agg(c.state, c.n) FILTER (WHERE c.state IS NOT NULL), '{}'::jsonb)
  FROM ojs_queues q
  LEFT JOIN (SELECT queue, state, count(*) AS n FROM ojs_jobs GROUP BY queue, state) c
    ON c.queue = q.name
 GROUP BY q.name
 ORDER BY q.name

-- name: queue_row
SELECT name, paused, created_at, rate_limit, concurrency FROM ojs_queues WHERE name = %s

-- name: queue_counts
SELECT state, count(*) FROM ojs_jobs WHERE queue = %s GROUP BY state

-- name: queue_throughput
SELECT count(*) FILTER (WHERE state = 'completed'), count(*) FILTER (WHERE state = 'discarded')
  FROM ojs_jobs WHERE queue = %s AND finished_at >= %s

-- name: upsert_queue_paused
INSERT INTO ojs_queues (name, paused, created_at) VALUES (%s, %s, %s)
ON CONFLICT (name) DO UPDATE SET paused = EXCLUDED.paused
RETURNING name, paused, created_at

-- name: insert_workflow
INSERT INTO ojs_workflows (id, state, record) VALUES (%s, %s, %s)

-- name: lock_workflow
SELECT record FROM ojs_workflows WHERE id = %s FOR UPDATE

-- name: get_workflow
SELECT record FROM ojs_workflows WHERE id = %s

-- name: update_workflow
UPDATE ojs_workflows SET state = %s, record = %s WHERE id = %s

-- name: upsert_cron
INSERT INTO ojs_crons (name, next_run_at, record) VALUES (%s, %s, %s)
ON CONFLICT (name) DO UPDATE SET next_run_at = EXCLUDED.next_run_at, record = EXCLUDED.record

-- name: lock_cron
SELECT record FROM ojs_crons WHERE name = %s FOR UPDATE

-- name: get_cron
SELECT record FROM ojs_crons WHERE name = %s

-- name: list_crons
SELECT record FROM ojs_crons ORDER BY name

-- name: delete_cron
DELETE FROM ojs_crons WHERE name = %s RETURNING record

-- name: advance_cron
UPDATE ojs_crons SET next_run_at = %(next_run_at)s, record = %(record)s
 WHERE name = %(name)s AND next_run_at = %(occurrence)s

-- name: reset
TRUNCATE ojs_jobs, ojs_queues, ojs_queue_starts, ojs_workflows, ojs_crons

-- name: notify
SELECT pg_notify('ojs_jobs', %s)

-- name: live_partition_dead_rows
-- Dead row versions in the live partition, as the cumulative statistics count them.
SELECT coalesce(n_dead_tup, 0), coalesce(n_live_tup, 0)
  FROM pg_stat_user_tables
 WHERE relid = 'ojs_jobs_live'::regclass

-- name: try_vacuum_lock
SELECT pg_try_advisory_lock(%s)

-- name: vacuum_unlock
SELECT pg_advisory_unlock(%s)

-- name: vacuum_live_partition
-- Every claim, heartbeat and ack leaves a dead row version here; claims step over
-- their index entries until a vacuum removes them.
VACUUM (ANALYZE) ojs_jobs_live
