-- fp-outbox admin queries, for psql or any SQL client.
--
-- Plain SQL with example values: change the literals (event names, ages, ids, insert ids) and paste.
-- The views fp_outbox_stuck, fp_outbox_overdue, fp_outbox_dead, fp_outbox_lag and fp_outbox_event_states
-- (every event's state, one row each) come with `fp-outbox migrate`. The events are insert-only: what
-- became of them is in the claims log (fp_outbox_claims), the retries and the dead letters beside them
-- (docs/internals.md). Statements that change rows say so in their first line; to look before you commit,
-- run them between BEGIN; and COMMIT; (or ROLLBACK;). The same jobs as commands:
-- `fp-outbox status | stuck | dead | requeue | purge | show` (see docs/operations.md).
-- tests/test_admin_queries.py runs every statement here against seeded rows, so none goes stale.
-- Rendered from worker/admin/queries.py (python docs/render_admin_sql.py): change them there.

-- name: lag
-- How many events per status, and the age in seconds of the oldest of each (for pending: the lag).
-- Delivered counts the deliveries the claims log records (kept for --retain-delivered).
SELECT * FROM fp_outbox_lag;

-- name: find_stuck
-- Events in flight past their lease: their worker died or hangs. Any running worker takes them
-- back by itself; if rows stay here, no worker is running (or requeue them, below).
SELECT * FROM fp_outbox_stuck ORDER BY lease_until;

-- name: find_overdue
-- Pending events due more than a minute ago but not sent: workers stopped, missing or far behind.
SELECT * FROM fp_outbox_overdue ORDER BY next_attempt_at LIMIT 100;

-- name: event_state
-- An event's state, one query away, by its $insert_id (what the destination and your logs show):
-- pending, in_flight, delivered or dead, with its attempts, lease, last answer and when it died.
-- insert_id has no index (the events' only index is their primary key): this reads the event table;
-- `fp-outbox show` reads it newest partition first and tells the whole history.
SELECT * FROM fp_outbox_event_states WHERE insert_id = '6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42';

-- name: inspect_event
-- The payload of one event, by its $insert_id, with the token taken out (payload is json, stored
-- verbatim; the cast to jsonb lends it jsonb's operators), wherever it is kept: the events, and the
-- copies a retry or a dead letter holds.
SELECT 'events' AS kept_in, id, created_at, payload::jsonb #- '{properties,token}' AS payload_without_token
  FROM fp_outbox_events WHERE insert_id = '6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42'
UNION ALL
SELECT 'retries', id, created_at, payload::jsonb #- '{properties,token}'
  FROM fp_outbox_retries WHERE insert_id = '6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42'
UNION ALL
SELECT 'dead letters', id, created_at, payload::jsonb #- '{properties,token}'
  FROM fp_outbox_dead_letters WHERE insert_id = '6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42';

-- name: event_claims
-- Each claim that held one event, by its row id (event_state shows it): when, by which worker, and
-- its answer (delivered; failed, with the HTTP status and reason; lease expired; in flight). Reach
-- back to the event's created_at: the claims' BRIN index on claimed_at reads only the log from then on.
SELECT c.id AS claim_id, c.kind, c.owner, c.claimed_at, c.lease_until, c.settled_at,
       CASE WHEN array_position(c.failed_ids, e.id) IS NOT NULL THEN 'failed'
            WHEN e.id = ANY (c.done) THEN 'delivered'
            WHEN c.expired THEN 'lease expired'
            WHEN c.lease_until < now() THEN 'in flight, past its lease'
            ELSE 'in flight' END AS answer,
       c.failed_statuses[array_position(c.failed_ids, e.id)] AS http_status,
       c.failed_errors[array_position(c.failed_ids, e.id)] AS reason
  FROM (SELECT CAST(5 AS bigint) AS id) AS e
  JOIN fp_outbox_claims AS c ON c.ids @> ARRAY[e.id]
 WHERE c.claimed_at >= now() - interval '2 days'
 ORDER BY c.id;

-- name: dead_by_reason
-- Dead events grouped by reason (HTTP status and the start of the error), most frequent first:
-- what went wrong, how often, and since when.
SELECT last_status, left(last_error, 120) AS reason, count(*) AS events,
       min(dead_at) AS first_dead_at, max(dead_at) AS last_dead_at
  FROM fp_outbox_dead
 GROUP BY last_status, left(last_error, 120)
 ORDER BY events DESC;

-- name: list_dead
-- The dead events of one reason and event name, newest first.
SELECT * FROM fp_outbox_dead
 WHERE last_status = 400 AND event_name = 'Purchase'
 ORDER BY dead_at DESC
 LIMIT 100;

-- name: requeue_dead
-- CHANGES ROWS. After fixing the cause, send dead events again: each dead letter becomes a retry due
-- now, attempts from 0, with the same payload and so the same $insert_id (a destination that
-- already has one drops the copy). Here: 'Purchase' events that died of a 400 in the last day.
WITH requeued AS (
    DELETE FROM fp_outbox_dead_letters
     WHERE last_status = 400 AND event_name = 'Purchase'
       AND dead_at > now() - interval '1 day'
 RETURNING id, insert_id, event_name, payload, created_at, trace_context, last_status, last_error)
INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                               next_attempt_at, last_status, last_error)
SELECT id, insert_id, event_name, payload, created_at, trace_context, 0, now(), last_status, last_error
  FROM requeued
    ON CONFLICT (id) DO UPDATE
   SET attempts = 0, next_attempt_at = now(), lease_owner = NULL, lease_until = NULL, delivered_at = NULL,
       last_status = excluded.last_status, last_error = excluded.last_error;

-- name: requeue_ids
-- CHANGES ROWS. Send these dead events again, by row id (as `fp-outbox dead` lists them).
WITH requeued AS (
    DELETE FROM fp_outbox_dead_letters
     WHERE id IN (101, 102)
 RETURNING id, insert_id, event_name, payload, created_at, trace_context, last_status, last_error)
INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                               next_attempt_at, last_status, last_error)
SELECT id, insert_id, event_name, payload, created_at, trace_context, 0, now(), last_status, last_error
  FROM requeued
    ON CONFLICT (id) DO UPDATE
   SET attempts = 0, next_attempt_at = now(), lease_owner = NULL, lease_until = NULL, delivered_at = NULL,
       last_status = excluded.last_status, last_error = excluded.last_error;

-- name: requeue_stuck
-- CHANGES ROWS. Make events stuck in flight past their lease due now, attempts from 0. Only expired
-- leases: a live worker's events are never taken from under it; the claims log records the requeue.
WITH taken AS (
    SELECT c.id AS claim_id, u.id, u.txid
      FROM fp_outbox_claims AS c, unnest(c.ids, c.txids) AS u(id, txid)
     WHERE c.settled_at IS NULL AND c.kind = 'fresh' AND c.lease_until < now() AND u.id <> ALL (c.done)
       FOR UPDATE OF c SKIP LOCKED),
logged AS (
    UPDATE fp_outbox_claims AS c
       SET done = c.done || t.ids, failed_ids = c.failed_ids || t.ids,
           failed_statuses = c.failed_statuses || array_fill(NULL::smallint, ARRAY[cardinality(t.ids)]),
           failed_errors = c.failed_errors || array_fill('lease expired, requeued by the operator'::text, ARRAY[cardinality(t.ids)]),
           settled_at = CASE WHEN cardinality(c.done) + cardinality(t.ids) >= cardinality(c.ids) THEN now() END,
           expired = cardinality(c.done) + cardinality(t.ids) >= cardinality(c.ids)
      FROM (SELECT claim_id, array_agg(id) AS ids FROM taken GROUP BY claim_id) AS t
     WHERE c.id = t.claim_id),
from_claims AS (
    INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                                   next_attempt_at, last_error)
    SELECT e.id, e.insert_id, e.event_name, e.payload, e.created_at, e.trace_context, 0, now(), 'lease expired, requeued by the operator'
      FROM taken AS t JOIN fp_outbox_events AS e ON e.txid = t.txid AND e.id = t.id
        ON CONFLICT (id) DO NOTHING
 RETURNING id),
from_retries AS (
    UPDATE fp_outbox_retries
       SET attempts = 0, next_attempt_at = now(), lease_owner = NULL, lease_until = NULL
     WHERE lease_owner IS NOT NULL AND lease_until < now() AND delivered_at IS NULL
 RETURNING id)
SELECT id FROM from_claims UNION ALL SELECT id FROM from_retries;

-- name: purge_delivered
-- DELETES ROWS (by TRUNCATE). Retire delivered events by whole partitions: each slot whose events
-- are all claimed and settled and whose newest is more than 7 days old is truncated; the outcome
-- says 'truncated' or why not (current, young, empty; unclaimed, unsettled, busy: kept). A slot
-- still written by a transaction is skipped after 200 ms, never waited for. No DELETE on the events.
SELECT slot, fp_outbox_truncate_slot(slot, 7 * 86400) AS outcome FROM generate_series(0, 15) AS slot;

-- name: purge_claims
-- DELETES ROWS. The claims log past retention: claims settled more than 7 days ago, at most 5000 per
-- run (repeat until 0; in psql add \watch 1 on the next line), never the latest fresh claim (it holds
-- the workers' shared position). On a big log prefer `fp-outbox purge --delivered-older-than 7d`.
DELETE FROM fp_outbox_claims
 WHERE id IN (SELECT id FROM fp_outbox_claims
               WHERE claimed_at < now() - interval '7 days' AND settled_at < now() - interval '7 days'
                 AND id <> (SELECT max(id) FROM fp_outbox_claims WHERE kind = 'fresh')
               LIMIT 5000
                 FOR UPDATE SKIP LOCKED);

-- name: purge_dead
-- DELETES ROWS. Dead letters that died more than 30 days ago, at most 5000 per run; repeat until 0.
-- Requeue the ones you still want first.
DELETE FROM fp_outbox_dead_letters
 WHERE id IN (SELECT id FROM fp_outbox_dead_letters
               WHERE dead_at < now() - interval '30 days'
               LIMIT 5000
                 FOR UPDATE SKIP LOCKED);
