"""The operator's SQL: every statement `fp-outbox` runs on the queue's table (stuck, dead, requeue, describe,
count purgeable, activity), named, each with why it is shaped so. The views of migration 0002 and
docs/admin.sql answer the same questions for people at a psql prompt; the purge batches themselves are the
engine's (worker.engine.retention), since the worker runs them too.
"""

from sqlalchemy import text

# Stuck: in flight past the lease (its worker died or hung). Read from the claim's partial index;
# any worker claims these again by itself, so rows that stay here mean no worker is running.
LIST_STUCK = text(
    """
    SELECT id, insert_id, event_name, attempts, lease_owner, lease_until,
           extract(epoch FROM now() - lease_until)::float8 AS lease_expired_s, last_status, last_error
      FROM fp_outbox_events
     WHERE status = 'in_flight' AND lease_until < now()
     ORDER BY lease_until
     LIMIT :limit
    """
)

# The same rows, counted, for `requeue --stuck --dry-run` and the footer of `stuck`.
COUNT_STUCK = text("SELECT count(*) FROM fp_outbox_events WHERE status = 'in_flight' AND lease_until < now()")

# The filters of `dead` and `requeue --dead`: each is off when its parameter is null, so one statement
# serves every combination. strpos instead of LIKE, so '%' and '_' in --error match themselves.
_DEAD_FILTER = """
    status = 'dead'
    AND (CAST(:event AS text) IS NULL OR event_name = CAST(:event AS text))
    AND (CAST(:older_than_s AS float8) IS NULL
         OR dead_at < now() - make_interval(secs => CAST(:older_than_s AS float8)))
    AND (CAST(:error AS text) IS NULL
         OR strpos(lower(coalesce(last_error, '')), lower(CAST(:error AS text))) > 0)
"""

# Newest first: after a bad deploy the operator wants the latest reasons on top. The partial index
# on dead rows serves it without touching the delivered rows kept for retention.
LIST_DEAD = text(
    f"""
    SELECT id, insert_id, event_name, attempts, last_status, last_error, dead_at, created_at
      FROM fp_outbox_events
     WHERE {_DEAD_FILTER}
     ORDER BY dead_at DESC, id DESC
     LIMIT :limit
    """
)

COUNT_DEAD = text(f"SELECT count(*) FROM fp_outbox_events WHERE {_DEAD_FILTER}")

# Requeue: due now with a fresh attempt budget, the same payload (so the same $insert_id: a
# destination that already has it drops the copy). last_status/last_error stay as history until
# the next attempt overwrites them.
_REQUEUE_SET = """
       SET status = 'pending', attempts = 0, next_attempt_at = now(),
           lease_owner = NULL, lease_until = NULL, dead_at = NULL
"""

REQUEUE_DEAD = text(f"UPDATE fp_outbox_events {_REQUEUE_SET} WHERE {_DEAD_FILTER}")

# Only leases that have expired: a live worker's row is never taken from under it. Should a worker
# claim the row meanwhile, PostgreSQL re-checks the condition after the row lock and skips it.
REQUEUE_STUCK = text(
    f"UPDATE fp_outbox_events {_REQUEUE_SET} WHERE status = 'in_flight' AND lease_until < now()"
)

# By id, still only dead or stuck rows: requeueing a pending, delivered or live in-flight row would
# just send it again (or twice at once).
REQUEUE_IDS = text(
    f"""
    UPDATE fp_outbox_events {_REQUEUE_SET}
     WHERE id = ANY(CAST(:ids AS bigint[]))
       AND (status = 'dead' OR (status = 'in_flight' AND lease_until < now()))
 RETURNING id
    """
)

# What the given ids are now, so `requeue --id` can say why it skipped one.
DESCRIBE_IDS = text(
    """
    SELECT id, status, (status = 'dead' OR (status = 'in_flight' AND lease_until < now())) AS requeueable
      FROM fp_outbox_events
     WHERE id = ANY(CAST(:ids AS bigint[]))
    """
)

# For `purge --dry-run` only: counting old delivered rows reads the whole table once.
COUNT_PURGEABLE = text(
    """
    SELECT count(*) FILTER (WHERE status = 'delivered'
                              AND delivered_at < now() - make_interval(secs => CAST(:delivered_s AS float8)))
               AS delivered,
           count(*) FILTER (WHERE status = 'dead'
                              AND dead_at < now() - make_interval(secs => CAST(:dead_s AS float8)))
               AS dead
      FROM fp_outbox_events
     WHERE status IN ('delivered', 'dead')
    """
)

# `fp-outbox status`: what is wrong now (stuck, overdue) and the throughput over the last minute.
# The first two come from the claim's partial index; the delivered count reads the table.
ACTIVITY = text(
    """
    SELECT (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'in_flight' AND lease_until < now()) AS stuck,
           (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'pending' AND next_attempt_at < now() - interval '1 minute') AS overdue,
           (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'delivered' AND delivered_at >= now() - interval '1 minute') AS delivered_last_minute,
           (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'dead' AND dead_at >= now() - interval '1 minute') AS dead_last_minute
    """
)
