-- fp-outbox admin queries, for psql or any SQL client.
--
-- Plain SQL with example values: change the literals (event names, ages, ids, insert ids) and paste.
-- The views fp_outbox_stuck, fp_outbox_overdue, fp_outbox_dead and fp_outbox_lag come with
-- `fp-outbox migrate`. Statements that change rows say so in their first line; to look before you
-- commit, run them between BEGIN; and COMMIT; (or ROLLBACK;). The same jobs as commands:
-- `fp-outbox stuck | dead | requeue | purge` (see docs/operations.md).
-- tests/test_admin_queries.py runs every statement here against seeded rows, so none goes stale.
-- Rendered from worker/admin/queries.py (python docs/render_admin_sql.py): change them there.

-- name: lag
-- How many events per status, and the age in seconds of the oldest of each (for pending: the lag).
SELECT * FROM fp_outbox_lag;

-- name: find_stuck
-- Events in flight past their lease: their worker died or hangs. Any running worker claims them
-- again by itself; if rows stay here, no worker is running (or requeue them, below).
SELECT * FROM fp_outbox_stuck ORDER BY lease_until;

-- name: find_overdue
-- Pending events due more than a minute ago but not sent: workers stopped, missing or far behind.
SELECT * FROM fp_outbox_overdue ORDER BY next_attempt_at LIMIT 100;

-- name: inspect_event
-- Everything about one event, by its $insert_id (what the destination and your logs show), with
-- the token taken out of the payload (payload is json, stored verbatim; the cast to jsonb lends it
-- jsonb's operators). insert_id has no index: this reads the table; by row id (WHERE id = 12345) it is instant.
SELECT id, status, event_name, attempts, created_at, next_attempt_at, lease_owner, lease_until,
       delivered_at, dead_at, last_status, last_error,
       payload::jsonb #- '{properties,token}' AS payload_without_token
  FROM fp_outbox_events
 WHERE insert_id = '6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42';

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
-- CHANGES ROWS. After fixing the cause, send dead events again: due now, attempts from 0, the same
-- payload and so the same $insert_id (a destination that already has one drops the copy). Here:
-- 'Purchase' events that died of a 400 in the last day.
UPDATE fp_outbox_events
   SET status = 'pending', attempts = 0, next_attempt_at = now(),
       lease_owner = NULL, lease_until = NULL, dead_at = NULL
 WHERE status = 'dead' AND last_status = 400 AND event_name = 'Purchase'
   AND dead_at > now() - interval '1 day';

-- name: requeue_ids
-- CHANGES ROWS. Send these dead events again, by row id (as `fp-outbox dead` lists them).
UPDATE fp_outbox_events
   SET status = 'pending', attempts = 0, next_attempt_at = now(),
       lease_owner = NULL, lease_until = NULL, dead_at = NULL
 WHERE id IN (101, 102) AND status = 'dead';

-- name: requeue_stuck
-- CHANGES ROWS. Make events stuck in flight past their lease due now, attempts from 0. Only expired
-- leases: a live worker's events are never taken from under it.
UPDATE fp_outbox_events
   SET status = 'pending', attempts = 0, next_attempt_at = now(),
       lease_owner = NULL, lease_until = NULL, dead_at = NULL
 WHERE status = 'in_flight' AND lease_until < now();

-- name: purge_delivered
-- DELETES ROWS. Delivered events delivered more than 7 days ago, at most 5000 per run, so each run
-- is a short transaction that never holds many locks; repeat until it deletes 0 rows (in psql,
-- add \watch 1 on the next line and press Ctrl-C at DELETE 0). On a big table prefer
-- `fp-outbox purge --delivered-older-than 7d`, which walks the primary key instead of scanning.
DELETE FROM fp_outbox_events
 WHERE id IN (SELECT id FROM fp_outbox_events
               WHERE status = 'delivered' AND delivered_at < now() - interval '7 days'
               LIMIT 5000
                 FOR UPDATE SKIP LOCKED);

-- name: purge_dead
-- DELETES ROWS. Dead events that died more than 30 days ago, at most 5000 per run; repeat until 0.
-- Requeue the ones you still want first.
DELETE FROM fp_outbox_events
 WHERE id IN (SELECT id FROM fp_outbox_events
               WHERE status = 'dead' AND dead_at < now() - interval '30 days'
               LIMIT 5000
                 FOR UPDATE SKIP LOCKED);
