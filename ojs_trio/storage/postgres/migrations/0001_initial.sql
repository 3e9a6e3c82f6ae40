-- ojs-trio schema, version 1.
--
-- Jobs keep their full envelope as JSONB (`record`, the engine's Job.to_record
-- form) next to the columns that queries filter, order or lock on.  Every
-- transition is applied by the engine's pure lifecycle rules inside one
-- transaction, so the columns and the record always change together.
--
-- The table is partitioned on `finished`: live jobs (waiting, scheduled,
-- running) sit in a small, aggressively vacuumed partition, and a job moves to
-- ojs_jobs_done when it completes, is cancelled or discarded.  Claims and
-- timers only ever touch the live partition, so they do not slow down as
-- finished rows pile up; the pruner deletes those after the retention period.

CREATE TABLE ojs_jobs (
    id               uuid        NOT NULL,
    finished         boolean     NOT NULL DEFAULT false,
    queue            text        NOT NULL,
    state            text        NOT NULL,
    priority         integer     NOT NULL DEFAULT 0,
    -- FIFO order within a priority; uuidv7 ids sort by creation time across servers.
    run_at           double precision,          -- scheduled/retryable: when it becomes available
    lease_until      double precision,          -- active: visibility deadline (or execution deadline)
    expires_at       double precision,          -- TTL for jobs not yet started
    unique_key       text,
    workflow_id      uuid,
    dead_letter      boolean     NOT NULL DEFAULT false,
    worker_id        text,
    created_at       double precision NOT NULL,
    finished_at      double precision,          -- completed/discarded/cancelled
    record           jsonb       NOT NULL,
    PRIMARY KEY (id, finished)
) PARTITION BY LIST (finished);

CREATE TABLE ojs_jobs_live PARTITION OF ojs_jobs FOR VALUES IN (false)
    WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01,
          autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0.02);
CREATE TABLE ojs_jobs_done PARTITION OF ojs_jobs FOR VALUES IN (true);

-- The claim index: only available rows, in delivery order.
CREATE INDEX ojs_jobs_claim ON ojs_jobs (queue, priority DESC, id) WHERE state = 'available';
CREATE INDEX ojs_jobs_due ON ojs_jobs (run_at) WHERE state IN ('scheduled', 'retryable');
CREATE INDEX ojs_jobs_leases ON ojs_jobs (lease_until) WHERE state = 'active';
CREATE INDEX ojs_jobs_ttl ON ojs_jobs (expires_at)
    WHERE expires_at IS NOT NULL AND state IN ('available', 'scheduled', 'retryable', 'pending');
CREATE INDEX ojs_jobs_unique ON ojs_jobs (unique_key, created_at) WHERE unique_key IS NOT NULL;
CREATE INDEX ojs_jobs_dead_letter ON ojs_jobs (queue, id) WHERE dead_letter;
CREATE INDEX ojs_jobs_workflow ON ojs_jobs (workflow_id) WHERE workflow_id IS NOT NULL;
CREATE INDEX ojs_jobs_queue_state ON ojs_jobs (queue, state);
CREATE INDEX ojs_jobs_finished ON ojs_jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE ojs_queues (
    name         text PRIMARY KEY,
    paused       boolean NOT NULL DEFAULT false,
    created_at   double precision NOT NULL,
    rate_limit   jsonb,
    concurrency  integer
);

-- Recent claim times per rate-limited queue (sliding window).
CREATE TABLE ojs_queue_starts (
    queue      text NOT NULL,
    started_at double precision NOT NULL
);
CREATE INDEX ojs_queue_starts_queue ON ojs_queue_starts (queue, started_at);

CREATE TABLE ojs_workflows (
    id      uuid PRIMARY KEY,
    state   text NOT NULL,
    record  jsonb NOT NULL
);

CREATE TABLE ojs_crons (
    name         text PRIMARY KEY,
    next_run_at  double precision,
    record       jsonb NOT NULL
);
