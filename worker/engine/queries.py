"""Every SQL statement of the queue cycle (claim, settle, release, the rate limiter, the drain check) and of the
engine's side services (retention, queue gauges, status counts), named, each with why it is shaped so."""

from sqlalchemy import text

# Claiming takes one statement, whichever rows it picks (the `due` part below): it locks them (SKIP LOCKED,
# so any number of workers claim side by side), leases them, counts the attempt, and reserves their slice
# of the shared rate budget (fp_outbox_take_permits: the advisory lock it takes is held only from here to
# the commit). It returns the stored payload text and the insert_id column: the worker fills in the token in
# Python (worker.engine.payload), so the token is never a parameter of any statement. With each row come its
# created_at (epoch seconds: the commit-to-delivery latency metric) and the trace context it was enqueued in
# (the delivery span links to it). It also returns what the statement's snapshot saw, for the floor of the
# fresh path: the oldest running transaction id (xmin), the next to be assigned (xmax) and the highest visible
# id (head). One row comes back even when nothing was claimed (with null row columns), so the snapshot is
# always read, and with it the endpoint's state: while the endpoint is down (fp_outbox_endpoint) no claim takes
# anything but the probe (`probe`, one row).
_CLAIM = """
    WITH due AS ({due}),
    claimed AS (
        UPDATE fp_outbox_events AS e
           SET status = 'in_flight',
               attempts = e.attempts + 1,
               lease_owner = :owner,
               lease_until = now() + make_interval(secs => :lease_s),
               next_attempt_at = now() + make_interval(secs => :lease_s)
          FROM due
         WHERE e.id = due.id
     RETURNING e.id, e.attempts, e.insert_id, e.payload::text AS payload,
               extract(epoch FROM e.created_at)::float8 AS created_at, e.trace_context),
    granted AS (  -- in the select list, so an empty claim never calls it (nor waits for its lock)
        SELECT fp_outbox_take_permits(c.n / CAST(:rate AS float8)) AS starts_at
          FROM (SELECT count(*) AS n FROM claimed) AS c
         WHERE c.n > 0)
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin,
           pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax,
           (SELECT max(id) FROM fp_outbox_events) AS head,
           (SELECT down_since IS NOT NULL FROM fp_outbox_endpoint) AS endpoint_down,
           extract(epoch FROM g.starts_at)::float8 AS starts_at,
           extract(epoch FROM g.starts_at - clock_timestamp())::float8 AS wait_s,
           c.id, c.attempts, c.insert_id, c.payload, c.created_at, c.trace_context
      FROM (SELECT 1) AS one
      LEFT JOIN granted AS g ON true
      LEFT JOIN claimed AS c ON true
     ORDER BY c.id
"""

# The fresh path, nearly every claim: rows above this worker's floor (worker.engine.floor), in id order,
# from the primary key. Everything below the floor has been claimed, settled or left to the sweep, so the
# dead versions that claims and settles leave behind sit below it and are never visited: the claim stays
# flat while some other transaction holds back vacuum. The status test sits inside a CASE, for two reasons
# (tests guard the plan): the planner cannot match it to the due index's predicate (a bitmap over that index
# reads every dead entry a held-back vacuum left in it), and it cannot estimate it from the column's
# statistics, which describe the whole table (mostly delivered, or nothing at all before the first ANALYZE)
# when above the floor nearly every row is pending: with such an estimate it chose to read and sort the
# whole backlog above the floor on every claim (2.3 ms for 25 rows of a 20,000 backlog instead of 0.2).
# clock_timestamp(), not now(): a row committed after this transaction began but before its snapshot is due
# too, or the floor could pass it.
CLAIM_FRESH = text(_CLAIM.format(due="""
        SELECT id FROM fp_outbox_events
         WHERE id > :floor AND CASE WHEN status = 'pending' THEN next_attempt_at <= clock_timestamp() END
           AND (CAST(:probe AS boolean) OR NOT EXISTS (SELECT 1 FROM fp_outbox_endpoint WHERE down_since IS NOT NULL))
         ORDER BY id
         LIMIT :limit
           FOR UPDATE SKIP LOCKED"""))

# The sweep, every second or so (worker.engine.floor.Sweeps): everything due, from the partial index of
# pending and in-flight rows, oldest due first: retries whose time came, rows whose lease expired (their
# worker died), released rows, rows of a claim that rolled back, and the rare late commit the floor passed.
CLAIM_SWEEP = text(_CLAIM.format(due="""
        SELECT id FROM fp_outbox_events
         WHERE status IN ('pending', 'in_flight') AND next_attempt_at <= now()
           AND (CAST(:probe AS boolean) OR NOT EXISTS (SELECT 1 FROM fp_outbox_endpoint WHERE down_since IS NOT NULL))
         ORDER BY next_attempt_at
         LIMIT :limit
           FOR UPDATE SKIP LOCKED"""))

# Where a worker's floor starts: just below the oldest due pending row among the newest `window` ids, else at
# the head. Due rows further back belong to the due path: a floor started below them would make every fresh
# claim read all that was delivered since (115-164 ms a claim with 500,000 rows in between, past the statement
# timeout at some 15 million). Reads at most `window` rows of the primary key.
FIRST_FLOOR = text(
    """
    SELECT coalesce((SELECT min(id) - 1 FROM fp_outbox_events
                      WHERE id > (SELECT coalesce(max(id), 0) FROM fp_outbox_events) - :window
                        AND status = 'pending' AND next_attempt_at <= now()),
                    (SELECT max(id) FROM fp_outbox_events), 0) AS floor
    """
)

# Settling only touches the claims this worker still holds: the owner and the status say the row is still
# leased to this worker, and the attempt count says it is the same claim (each claim counts one). A row whose
# lease expired and was claimed again, by another worker or by this one, is that claim's to settle: the
# late outcome of the earlier claim matches nothing.
MARK_DELIVERED = text(
    """
    UPDATE fp_outbox_events AS e
       SET status = 'delivered', delivered_at = now(), lease_owner = NULL, lease_until = NULL,
           last_status = u.http_status, last_error = NULL
      FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]), CAST(:statuses AS smallint[]))
           AS u(id, attempts, http_status)
     WHERE e.id = u.id AND e.attempts = u.attempts AND e.lease_owner = :owner AND e.status = 'in_flight'
    """
)

# Back to pending with the durable backoff computed by the worker; the delay travels as seconds
# so the database clock (shared by every worker) sets the time. An attempt made while the endpoint was down
# is not `counted`: the claim's count is given back (worker.engine.endpoint).
SCHEDULE_RETRY = text(
    """
    UPDATE fp_outbox_events AS e
       SET status = 'pending', lease_owner = NULL, lease_until = NULL,
           next_attempt_at = now() + make_interval(secs => u.delay_s),
           attempts = CASE WHEN u.counted THEN e.attempts ELSE greatest(e.attempts - 1, 0) END,
           last_status = u.http_status, last_error = u.error
      FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]), CAST(:delays AS float8[]),
                  CAST(:statuses AS smallint[]), CAST(:errors AS text[]), CAST(:counted AS boolean[]))
           AS u(id, attempts, delay_s, http_status, error, counted)
     WHERE e.id = u.id AND e.attempts = u.attempts AND e.lease_owner = :owner AND e.status = 'in_flight'
    """
)

# Dead rows leave the partial index, so they cost the claim nothing; the reason stays for operators.
MARK_DEAD = text(
    """
    UPDATE fp_outbox_events AS e
       SET status = 'dead', dead_at = now(), lease_owner = NULL, lease_until = NULL,
           last_status = u.http_status, last_error = u.error
      FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]), CAST(:statuses AS smallint[]),
                  CAST(:errors AS text[])) AS u(id, attempts, http_status, error)
     WHERE e.id = u.id AND e.attempts = u.attempts AND e.lease_owner = :owner AND e.status = 'in_flight'
    """
)

# On shutdown, hand back what was claimed but not finished, due at once, and give back the
# attempt it was charged: it was never (fully) tried, and waiting out the lease helps nobody.
RELEASE = text(
    """
    UPDATE fp_outbox_events AS e
       SET status = 'pending', lease_owner = NULL, lease_until = NULL, next_attempt_at = now(),
           attempts = greatest(e.attempts - 1, 0)
      FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[])) AS u(id, attempts)
     WHERE e.id = u.id AND e.attempts = u.attempts AND e.lease_owner = :owner AND e.status = 'in_flight'
    """
)

# --drain's question, answered from the partial index alone.
ANY_UNFINISHED = text(
    "SELECT EXISTS (SELECT 1 FROM fp_outbox_events WHERE status IN ('pending', 'in_flight'))"
)

# GCRA: each grant moves the shared schedule (a sequence, updated in place: no row versions) forward by
# n/rate under an advisory lock held to the end of this transaction (fp_outbox_take_permits, migration 0003);
# the caller's slice starts at `starts_at` and it waits until then. The database clock is the one clock all
# hosts share; the wait is measured after the grant, so it is never short.
ACQUIRE_PERMITS = text(
    """
    SELECT extract(epoch FROM g.starts_at)::float8 AS starts_at,
           extract(epoch FROM g.starts_at - clock_timestamp())::float8 AS wait_s
      FROM fp_outbox_take_permits(CAST(:span_s AS float8)) AS g(starts_at)
    """
)

# The schedule is absolute time on the database's clock: after a step back of that clock (or a failover to a
# host whose clock is behind) it lies in the future. A grant that starts further ahead than the schedule can
# legitimately run puts it back to now (fp_outbox_reset_permits, migration 0004, under the same lock); how
# far ahead it was comes back when it did, else null.
RESET_PERMITS = text(
    """
    SELECT fp_outbox_reset_permits(CAST(:max_ahead_s AS float8)) AS ahead_s
    """
)

# A 429 slows every worker, not just the one that got it: no slice starts before the pause ends.
# `set_at` is read after the pause is in place, for the tests that check nobody started during it.
PAUSE_ALL = text(
    """
    SELECT extract(epoch FROM p.until)::float8 AS until, extract(epoch FROM clock_timestamp())::float8 AS set_at
      FROM fp_outbox_pause_permits(CAST(:pause_s AS float8)) AS p(until)
    """
)

# Counts per status and the age of the oldest event not yet settled: `fp-outbox status`, the demo and the
# benchmarks. Counting delivered rows reads the table, so the gauges below use QUEUE_DEPTH instead.
STATUS_COUNTS = text(
    """
    SELECT (SELECT count(*) FROM fp_outbox_events WHERE status = 'pending') AS pending,
           (SELECT count(*) FROM fp_outbox_events WHERE status = 'in_flight') AS in_flight,
           (SELECT count(*) FROM fp_outbox_events WHERE status = 'delivered') AS delivered,
           (SELECT count(*) FROM fp_outbox_events WHERE status = 'dead') AS dead,
           (SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8
              FROM fp_outbox_events WHERE status IN ('pending', 'in_flight')) AS oldest_pending_age_s
    """
)

# The gauges' figures for every worker's scrape. Pending, in flight and the oldest age come from the
# claim's partial index, dead from the dead rows' one: no scan of the delivered rows, which is what
# keeps this cheap enough to run every few seconds on a table holding a week of deliveries.
QUEUE_DEPTH = text(
    """
    SELECT (SELECT count(*) FROM fp_outbox_events WHERE status = 'pending') AS pending,
           (SELECT count(*) FROM fp_outbox_events WHERE status = 'in_flight') AS in_flight,
           (SELECT count(*) FROM fp_outbox_events WHERE status = 'dead') AS dead,
           (SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8
              FROM fp_outbox_events WHERE status IN ('pending', 'in_flight')) AS oldest_pending_age_s
    """
)

# The oldest open transaction in this database that holds the vacuum horizon back: one with an xid, or a
# snapshot (backend_xmin: a REPEATABLE READ report, pg_dump, a statement still running), and prepared
# transactions. While it is open, no dead row version younger than it can be removed from any table here.
# pg_stat_activity shows other roles' sessions only to roles granted pg_read_all_stats (or pg_monitor);
# without it the figure covers this role's own sessions only.
OLDEST_TRANSACTION = text(
    """
    SELECT extract(epoch FROM clock_timestamp() - started)::float8 AS oldest_transaction_age_s,
           pid AS oldest_transaction_pid, state AS oldest_transaction_state
      FROM (SELECT xact_start AS started, pid, state FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) AND xact_start IS NOT NULL
            UNION ALL
            SELECT prepared, NULL, 'prepared ' || gid FROM pg_prepared_xacts
             WHERE database = current_database()) AS holding
     ORDER BY started
     LIMIT 1
    """
)

# Worker processes connected to this database, on every host: each names its connections
# `fp-outbox-worker <unique>:<pid>:<host>` (Settings.application_name), a process's pool and listener alike.
# pg_stat_activity shows every session's application_name to any role. Behind PgBouncer's transaction pooling
# the server connections carry whichever client's name used them last, so the figure is only a hint there.
WORKERS_CONNECTED = text(
    """
    SELECT count(DISTINCT application_name) FROM pg_stat_activity
     WHERE datname = current_database() AND application_name LIKE 'fp-outbox-worker %'
    """
)

# Retention of delivered rows. There is no index on delivered_at (it would cost every delivery a
# write), so each batch walks the next `batch_size` rows in primary-key order, i.e. enqueue order, from
# where the last batch stopped, and deletes the old delivered ones among them. A row created after the
# cutoff cannot have been delivered before it, so a batch made only of such rows ends the walk (`done`):
# the cost follows the rows deleted, not the size of the table (a whole batch, not the first young row, so
# that ids taken slightly out of created_at order by concurrent transactions are still reached).
# `lowest_kept` is the first row of the batch that is neither deleted nor dead (pending, in flight, or
# delivered too recently): the next walk starts there, since it may become deletable later; dead rows have
# their own retention, below. SKIP LOCKED lets two purges (two workers) run side by side.
PURGE_DELIVERED_BATCH = text(
    """
    WITH examined AS (
        SELECT id, status, created_at FROM fp_outbox_events
         WHERE id > :after
         ORDER BY id
         LIMIT :batch_size),
    doomed AS (
        SELECT e.id FROM fp_outbox_events AS e
         WHERE e.id IN (SELECT id FROM examined WHERE status = 'delivered')
           AND e.status = 'delivered'
           AND e.delivered_at < now() - make_interval(secs => CAST(:older_than_s AS float8))
           FOR UPDATE SKIP LOCKED),
    deleted AS (
        DELETE FROM fp_outbox_events AS e USING doomed WHERE e.id = doomed.id RETURNING e.id)
    SELECT (SELECT count(*) FROM deleted) AS deleted,
           (SELECT max(id) FROM examined) AS last_id,
           (SELECT min(id) FROM examined
             WHERE status <> 'dead' AND id NOT IN (SELECT id FROM deleted)) AS lowest_kept,
           coalesce((SELECT bool_and(created_at >= now() - make_interval(secs => CAST(:older_than_s AS float8)))
                       FROM examined), true) AS done
    """
)

# Dead rows have their own partial index on dead_at, so the oldest come straight from it.
PURGE_DEAD_BATCH = text(
    """
    WITH doomed AS (
        SELECT id FROM fp_outbox_events
         WHERE status = 'dead' AND dead_at < now() - make_interval(secs => CAST(:older_than_s AS float8))
         ORDER BY dead_at
         LIMIT :batch_size
           FOR UPDATE SKIP LOCKED),
    deleted AS (
        DELETE FROM fp_outbox_events AS e USING doomed WHERE e.id = doomed.id RETURNING e.id)
    SELECT count(*) AS deleted, max(id) AS last_id, count(*) < :batch_size AS done FROM deleted
    """
)

# ---------------------------------------------------------------- the endpoint's shared state (an outage)
# One row (migration 0006), read by every claim: while the endpoint is down no claim takes a row, except the
# one probe at a time that the worker holding the probe lease sends. Written only at a change and per probe.

# The first worker to see every recent request fail declares the outage; the others find it declared. The
# first probe may start `first_probe_s` from now.
ENDPOINT_DOWN = text(
    """
    UPDATE fp_outbox_endpoint
       SET down_since = now(), probes = 0, next_probe_at = now() + make_interval(secs => :first_probe_s),
           probe_owner = NULL, probe_until = NULL, reason = :reason, changed_at = now()
     WHERE down_since IS NULL
    RETURNING 1 AS declared
    """
)

# The probe lease: one worker at a time, once the next probe is due; a prober that died lets it go at
# probe_until. The probe after this one may start an interval from now (doubling from `base_s` with each
# failed probe, at most `cap_s`), or as soon as this one ends if it takes longer. Returns the probes already
# failed in this outage (no row: not this worker's turn).
TAKE_PROBE = text(
    """
    UPDATE fp_outbox_endpoint
       SET probe_owner = :owner, probe_until = now() + make_interval(secs => :lease_s),
           next_probe_at = now() + make_interval(secs => least(CAST(:cap_s AS float8),
                                                               :base_s * power(2, least(probes, 32))))
     WHERE down_since IS NOT NULL AND next_probe_at <= now()
       AND (probe_owner IS NULL OR probe_until < now() OR probe_owner = :owner)
    RETURNING probes
    """
)

# A probe that failed, or found nothing to send (`failed` false: it may start again `retry_in_s` from now).
PROBE_DONE = text(
    """
    UPDATE fp_outbox_endpoint
       SET probes = probes + CAST(:failed AS boolean)::int, probe_owner = NULL, probe_until = NULL,
           next_probe_at = CASE WHEN CAST(:failed AS boolean) THEN next_probe_at
                                ELSE now() + make_interval(secs => :retry_in_s) END,
           reason = coalesce(:reason, reason)
     WHERE probe_owner = :owner AND down_since IS NOT NULL
    """
)

# The endpoint answered: the outage is over, and every row waiting for a later attempt is due at once (their
# backoff was the outage's, not theirs). Returns how long it was down, and how many rows became due.
ENDPOINT_UP = text(
    """
    WITH was AS (
        SELECT down_since FROM fp_outbox_endpoint WHERE down_since IS NOT NULL FOR UPDATE),
    up AS (
        UPDATE fp_outbox_endpoint AS e
           SET down_since = NULL, probes = 0, next_probe_at = NULL, probe_owner = NULL, probe_until = NULL,
               reason = NULL, changed_at = now()
          FROM was
        RETURNING was.down_since),
    due AS (
        UPDATE fp_outbox_events SET next_attempt_at = now()
         WHERE status = 'pending' AND next_attempt_at > now() AND EXISTS (SELECT 1 FROM up)
        RETURNING 1)
    SELECT (SELECT extract(epoch FROM now() - down_since)::float8 FROM up) AS down_s,
           (SELECT count(*) FROM due) AS made_due
    """
)

# For `fp-outbox status` and the gauges: the endpoint's state as the workers share it.
ENDPOINT_STATE = text(
    """
    SELECT down_since IS NOT NULL AS down, extract(epoch FROM clock_timestamp() - down_since)::float8 AS down_s,
           probes, extract(epoch FROM next_probe_at - clock_timestamp())::float8 AS next_probe_in_s, reason
      FROM fp_outbox_endpoint
    """
)

# Whether this connection's database takes writes: a standby (in recovery), or read-only by default for this
# role or database (a demoted primary's usual state during a failover), is "read-only".
DATABASE_STATE = text(
    """
    SELECT CASE WHEN pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'
                THEN 'read-only' ELSE 'read-write' END AS database
    """
)
