"""Every SQL statement of the queue cycle (claim, settle, the expired claims' recovery, the rate limiter, the drain
check, the endpoint's state) and of the engine's side services (retention, queue gauges, status counts), named,
each with why it is shaped so. The storage they work on is migration 0007's (see outbox.schema)."""

from sqlalchemy import text

# Each statement of the cycle opens with a comment naming it, which pg_stat_activity shows first (its text is cut
# at track_activity_query_size): an operator, or a test, sees which statement a backend is in.
# Every claim returns, beside its rows, the endpoint's state (fp_outbox_endpoint: while it is down no claim takes
# anything but the probe, `probe`, one row) and the rows' slice of the shared rate budget (fp_outbox_take_permits,
# whose advisory lock is held from here to the commit). One row comes back even when nothing was claimed (with
# null row columns), so the state is always read. Rows carry the stored payload text and the insert_id column: the
# worker fills in the token in Python (worker.engine.payload), so the token is never a parameter of any statement.
_CLAIMED = """
    {claim},
    granted AS (  -- in the select list, so an empty claim never calls it (nor waits for its lock)
        SELECT fp_outbox_take_permits(c.n / CAST(:rate AS float8)) AS starts_at
          FROM (SELECT count(*) AS n FROM claimed) AS c
         WHERE c.n > 0)
    SELECT (SELECT down_since IS NOT NULL FROM fp_outbox_endpoint) AS endpoint_down,
           extract(epoch FROM g.starts_at)::float8 AS starts_at,
           extract(epoch FROM g.starts_at - clock_timestamp())::float8 AS wait_s,
           c.claim_id, c.id, c.txid, c.attempts, c.insert_id, c.payload,
           extract(epoch FROM c.created_at)::float8 AS created_at, c.trace_context
      FROM (SELECT 1) AS one
      LEFT JOIN granted AS g ON true
      LEFT JOIN claimed AS c ON true
     ORDER BY c.id
"""

# The fresh path, nearly every claim: the next events past the shared position, in (txid, id) order, from the
# events' primary key (fp_outbox_claim_fresh, migration 0007: PgQ's snapshot windows, so an event whose
# transaction commits late is claimed by the first window that sees it committed, and one that rolls back by
# none). The position is read and the claims row written under an advisory lock: one fresh claim at a time, for
# all workers, each a millisecond or so. Insert-only storage: no dead version is ever in its way.
CLAIM_FRESH = text(_CLAIMED.format(claim="""
    /* fp-outbox claim fresh */
    WITH claimed AS (
        SELECT f.claim_id, f.id, f.txid::text AS txid, 1 AS attempts, f.insert_id, f.payload, f.created_at,
               f.trace_context
          FROM fp_outbox_claim_fresh(:owner, CAST(:lease_s AS float8), CAST(:limit AS integer),
                                     CAST(:probe AS boolean)) AS f)"""))

# The due path: retries whose time came (failed attempts, expired leases, released and requeued events), oldest
# due first, from the retries' own index; leased per row (their lease is next_attempt_at, so an expired one is
# due again), and logged as one claims row.
CLAIM_DUE = text(_CLAIMED.format(claim="""
    /* fp-outbox claim due */
    WITH due AS (
        SELECT id FROM fp_outbox_retries
         WHERE next_attempt_at <= now()
           AND (CAST(:probe AS boolean) OR NOT EXISTS (SELECT 1 FROM fp_outbox_endpoint WHERE down_since IS NOT NULL))
         ORDER BY next_attempt_at
         LIMIT :limit
           FOR UPDATE SKIP LOCKED),
    leased AS (
        UPDATE fp_outbox_retries AS r
           SET attempts = r.attempts + 1, lease_owner = :owner,
               lease_until = now() + make_interval(secs => :lease_s),
               next_attempt_at = now() + make_interval(secs => :lease_s)
          FROM due
         WHERE r.id = due.id
     RETURNING r.id, r.attempts, r.insert_id, r.payload::text AS payload, r.created_at, r.trace_context),
    logged AS (
        INSERT INTO fp_outbox_claims (kind, owner, lease_until, ids)
        SELECT 'due', :owner, now() + make_interval(secs => :lease_s), array_agg(id ORDER BY id)
          FROM leased HAVING count(*) > 0
     RETURNING id),
    claimed AS (
        SELECT (SELECT id FROM logged) AS claim_id, l.id, NULL::text AS txid, l.attempts, l.insert_id, l.payload,
               l.created_at, l.trace_context
          FROM leased AS l)"""))

# Claims whose lease expired (their worker died or hung): settled as expired, and the events of a fresh one that
# were not done become retries, due now, their claim counted as an attempt. A due claim's retries come back by
# their own lease. Run by the due path of any worker before it claims.
RECOVER_EXPIRED = text(
    """
    /* fp-outbox recover expired */
    WITH expired AS (
        SELECT id, kind, ids, txids, done FROM fp_outbox_claims
         WHERE settled_at IS NULL AND lease_until < now()
         ORDER BY lease_until
         LIMIT :limit
           FOR UPDATE SKIP LOCKED),
    marked AS (
        UPDATE fp_outbox_claims AS c SET settled_at = now(), expired = true FROM expired AS x WHERE c.id = x.id
     RETURNING c.id),
    lost AS (
        SELECT u.id, u.txid FROM expired AS x, unnest(x.ids, x.txids) AS u(id, txid)
         WHERE x.kind = 'fresh' AND u.id <> ALL (x.done)),
    moved AS (
        INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                                       next_attempt_at, last_error)
        SELECT e.id, e.insert_id, e.event_name, e.payload, e.created_at, e.trace_context, 1, now(), :reason
          FROM lost AS l JOIN fp_outbox_events AS e ON e.txid = l.txid AND e.id = l.id
            ON CONFLICT (id) DO NOTHING
     RETURNING 1)
    SELECT (SELECT count(*) FROM marked) AS claims, (SELECT count(*) FROM moved) AS events
    """
)

# What one settle writes to the claims log, for the claims it still holds: the ids done, the count delivered, and
# each failed attempt's answer; settled once every id is done. `u` holds the outcomes (see SETTLE_*).
_LOG_OUTCOMES = """
    logged AS (
        UPDATE fp_outbox_claims AS c
           SET done = c.done || g.ids, delivered = c.delivered + g.delivered,
               failed_ids = c.failed_ids || g.failed_ids, failed_statuses = c.failed_statuses || g.failed_statuses,
               failed_errors = c.failed_errors || g.failed_errors,
               settled_at = CASE WHEN cardinality(c.done) + cardinality(g.ids) >= cardinality(c.ids) THEN now() END,
               -- only an open claim needs its events' txids (to find them again); a settled one is rewritten without
               txids = CASE WHEN cardinality(c.done) + cardinality(g.ids) >= cardinality(c.ids) THEN '{}' ELSE c.txids END
          FROM (SELECT claim_id, array_agg(id) AS ids, count(*) FILTER (WHERE kind = 'delivered') AS delivered,
                       coalesce(array_agg(id) FILTER (WHERE kind <> 'delivered'), '{}') AS failed_ids,
                       coalesce(array_agg(status) FILTER (WHERE kind <> 'delivered'), '{}') AS failed_statuses,
                       coalesce(array_agg(error) FILTER (WHERE kind <> 'delivered'), '{}') AS failed_errors
                  FROM held_outcomes GROUP BY claim_id) AS g
         WHERE c.id = g.claim_id
     RETURNING c.id)"""

_OUTCOMES = """
    u AS (
        SELECT * FROM unnest(CAST(:claim_ids AS bigint[]), CAST(:ids AS bigint[]), CAST(:txids AS xid8[]),
                             CAST(:attempts AS integer[]), CAST(:kinds AS text[]), CAST(:statuses AS smallint[]),
                             CAST(:errors AS text[]), CAST(:delays AS float8[]), CAST(:counted AS boolean[]))
               AS u(claim_id, id, txid, attempt, kind, status, error, delay_s, counted))"""

# Settling a fresh claim: only a claim this worker still holds (its owner, not settled: a claim whose lease expired
# was settled as expired, and its events went to the retries). Delivered events cost the log's row and nothing
# else; a failed one becomes a retries row (attempts 1, or 0 when not counted: an outage, a release at shutdown),
# a dead one a dead letter, both copied from the event's row in SQL (never the payload as a parameter).
_SETTLE_FRESH = """
    /* fp-outbox settle fresh */
    WITH {outcomes},
    held_claims AS (
        SELECT id, done FROM fp_outbox_claims
         WHERE id IN (SELECT claim_id FROM u) AND owner = :owner AND kind = 'fresh' AND settled_at IS NULL
           FOR UPDATE),
    held_outcomes AS (  -- not done yet: settling the same outcome again (a retry after a lost reply) changes nothing
        SELECT u.* FROM u JOIN held_claims AS c ON c.id = u.claim_id WHERE u.id <> ALL (c.done)),
    {log}{failed}
    SELECT count(*) AS held FROM held_outcomes
    """
_COPY_FAILED = """,
    retried AS (
        INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                                       next_attempt_at, last_status, last_error)
        SELECT e.id, e.insert_id, e.event_name, e.payload, e.created_at, e.trace_context,
               CASE WHEN h.counted THEN 1 ELSE 0 END, now() + make_interval(secs => h.delay_s), h.status, h.error
          FROM held_outcomes AS h JOIN fp_outbox_events AS e ON e.txid = h.txid AND e.id = h.id
         WHERE h.kind = 'retry'
            ON CONFLICT (id) DO NOTHING
     RETURNING 1),
    died AS (
        INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                                            last_status, last_error)
        SELECT e.id, e.insert_id, e.event_name, e.payload, e.created_at, e.trace_context, 1, h.status, h.error
          FROM held_outcomes AS h JOIN fp_outbox_events AS e ON e.txid = h.txid AND e.id = h.id
         WHERE h.kind = 'dead'
            ON CONFLICT (id) DO NOTHING
     RETURNING 1)"""
SETTLE_FRESH = text(_SETTLE_FRESH.format(outcomes=_OUTCOMES, log=_LOG_OUTCOMES, failed=_COPY_FAILED))
# The same when every outcome is a delivery (nearly every settle): the claims log alone. Statements are planned at
# every execution (no prepared statements, for PgBouncer), and the copies' joins over the events' 16 partitions
# made the planning 0.9 ms a settle; without them 0.26 ms.
SETTLE_FRESH_DELIVERED = text(_SETTLE_FRESH.format(outcomes=_OUTCOMES, log=_LOG_OUTCOMES, failed=""))

# Settling due claims: only retries rows this worker still holds, leased by this claim (owner and attempt:
# an outcome of an earlier claim of the same row never applies). Delivered: the row stays, delivered; retry: back to waiting
# with the durable backoff (an attempt not counted is given back); dead: moved to the dead letters.
SETTLE_DUE = text(
    f"""
    /* fp-outbox settle due */
    WITH {_OUTCOMES},
    held AS (
        SELECT r.id FROM fp_outbox_retries AS r JOIN u ON u.id = r.id
         WHERE r.lease_owner = :owner AND r.attempts = u.attempt
           FOR UPDATE OF r),
    held_outcomes AS (SELECT * FROM u WHERE id IN (SELECT id FROM held)),
    {_LOG_OUTCOMES},
    delivered AS (  -- kept for its history (attempts, answers) until retention, out of every due claim's way
        UPDATE fp_outbox_retries AS r
           SET delivered_at = now(), lease_owner = NULL, lease_until = NULL, next_attempt_at = 'infinity',
               last_status = h.status, last_error = NULL
          FROM held_outcomes AS h
         WHERE r.id = h.id AND h.kind = 'delivered'
     RETURNING r.id),
    retried AS (
        UPDATE fp_outbox_retries AS r
           SET lease_owner = NULL, lease_until = NULL, next_attempt_at = now() + make_interval(secs => h.delay_s),
               attempts = CASE WHEN h.counted THEN r.attempts ELSE greatest(r.attempts - 1, 0) END,
               last_status = h.status, last_error = h.error
          FROM held_outcomes AS h
         WHERE r.id = h.id AND h.kind = 'retry'
     RETURNING r.id),
    gone AS (
        DELETE FROM fp_outbox_retries AS r USING held_outcomes AS h
         WHERE r.id = h.id AND h.kind = 'dead'
     RETURNING r.id, r.insert_id, r.event_name, r.payload, r.created_at, r.trace_context, r.attempts, h.status,
               h.error),
    died AS (
        INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                                            last_status, last_error)
        SELECT id, insert_id, event_name, payload, created_at, trace_context, attempts, status, error FROM gone
            ON CONFLICT (id) DO NOTHING
     RETURNING 1)
    SELECT count(*) AS held FROM held_outcomes
    """
)

# --drain's question: is anything waiting (an event past the position, a retry) or in flight (an unsettled claim)?
ANY_UNFINISHED = text(
    """
    WITH pos AS (
        SELECT win_lo, win_hi, key_txid, key_id FROM fp_outbox_claims WHERE kind = 'fresh' ORDER BY id DESC LIMIT 1)
    SELECT EXISTS (SELECT 1 FROM fp_outbox_retries WHERE delivered_at IS NULL)
        OR EXISTS (SELECT 1 FROM fp_outbox_claims WHERE settled_at IS NULL)
        OR NOT EXISTS (SELECT 1 FROM pos) AND EXISTS (SELECT 1 FROM fp_outbox_events)
        OR EXISTS (SELECT 1 FROM fp_outbox_events AS e, pos AS p
                    WHERE e.txid >= pg_snapshot_xmin(p.win_lo) AND NOT pg_visible_in_snapshot(e.txid, p.win_lo)
                      AND NOT (pg_visible_in_snapshot(e.txid, p.win_hi)
                               AND (e.txid, e.id) <= (p.key_txid, p.key_id))) AS unfinished
    """
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

# ---------------------------------------------------------------- the queue's figures (status, gauges, --drain)
# What is waiting or in flight, each part read as the claims read it, so the figures cost what waits, not what is
# kept: the events past the shared position (the window's stragglers, those running at win_lo; then from the key
# on, from the primary key; then what was running at win_hi), the events of unsettled fresh claims not yet done,
# and the retries not delivered (their index: a delivered one waits at 'infinity'). No scan of the delivered
# events, so it is cheap enough for every scrape; the same rows as the view fp_outbox_event_states. Each part of
# the events is a txid range with both ends: the planner, which cannot see the position's values, then takes it
# for a narrow range of the primary key, whatever the statistics say (with one end only it guesses a third of the
# table, and a big batch enqueued in one transaction makes `= ANY` of the running ones look like most of it).
_QUEUE = """
    pos AS MATERIALIZED (
        SELECT win_lo, win_hi, key_txid, key_id FROM fp_outbox_claims WHERE kind = 'fresh' ORDER BY id DESC LIMIT 1),
    past AS (
        SELECT e.created_at FROM fp_outbox_events AS e
         WHERE e.txid >= (SELECT pg_snapshot_xmin(win_lo) FROM pos)
           AND e.txid < (SELECT pg_snapshot_xmax(win_lo) FROM pos)
           AND e.txid = ANY (ARRAY(SELECT pg_snapshot_xip(win_lo) FROM pos))
           AND NOT (pg_visible_in_snapshot(e.txid, (SELECT win_hi FROM pos))
                    AND (e.txid, e.id) <= ((SELECT key_txid FROM pos), (SELECT key_id FROM pos)))
        UNION ALL
        SELECT e.created_at FROM fp_outbox_events AS e
         WHERE e.txid >= coalesce((SELECT pg_snapshot_xmax(win_lo) FROM pos), '0')
           AND e.txid < pg_snapshot_xmax(pg_current_snapshot())
           AND (e.txid, e.id) > (coalesce((SELECT key_txid FROM pos), '0'), coalesce((SELECT key_id FROM pos), 0))
           AND coalesce(pg_visible_in_snapshot(e.txid, (SELECT win_hi FROM pos))
                        OR e.txid >= (SELECT pg_snapshot_xmax(win_hi) FROM pos), true)
        UNION ALL
        SELECT e.created_at FROM fp_outbox_events AS e
         WHERE e.txid >= (SELECT pg_snapshot_xmax(win_lo) FROM pos)
           AND e.txid < (SELECT pg_snapshot_xmax(win_hi) FROM pos)
           AND e.txid = ANY (ARRAY(SELECT pg_snapshot_xip(win_hi) FROM pos))),
    flying AS (
        SELECT u.id, u.txid FROM fp_outbox_claims AS c, unnest(c.ids, c.txids) AS u(id, txid)
         WHERE c.settled_at IS NULL AND c.kind = 'fresh' AND u.id <> ALL (c.done)),
    retrying AS (
        SELECT lease_owner, created_at FROM fp_outbox_retries
         WHERE next_attempt_at < 'infinity' AND delivered_at IS NULL)"""

_QUEUE_FIGURES = """
           (SELECT count(*) FROM past) + (SELECT count(*) FROM retrying WHERE lease_owner IS NULL) AS pending,
           (SELECT count(*) FROM flying) + (SELECT count(*) FROM retrying WHERE lease_owner IS NOT NULL) AS in_flight,
           (SELECT count(*) FROM fp_outbox_dead_letters) AS dead,
           extract(epoch FROM clock_timestamp() - least(
               (SELECT min(created_at) FROM past), (SELECT min(created_at) FROM retrying),
               (SELECT min(e.created_at) FROM flying AS f JOIN fp_outbox_events AS e ON e.txid = f.txid AND e.id = f.id)
           ))::float8 AS oldest_pending_age_s"""

# `fp-outbox status`, the demo and the benchmarks: the queue's figures, and the deliveries the claims log records
# (kept for --retain-delivered): one row per claim, so it reads the log, never the events.
STATUS_COUNTS = text(f"""
    WITH {_QUEUE}
    SELECT {_QUEUE_FIGURES},
           (SELECT coalesce(sum(delivered), 0) FROM fp_outbox_claims) AS delivered
    """)

# The gauges' figures, for every worker's scrape (worker.engine.metrics), and `status --watch` every second.
QUEUE_DEPTH = text(f"""
    WITH {_QUEUE}
    SELECT {_QUEUE_FIGURES}
    """)

# While the previous release's table is there (after an upgrade, until `migrate` drops it empty), what it still
# holds counts too: its unfinished and dead rows from its partial indexes; its delivered ones read the table, so
# only `status` counts them. The mover (worker.engine.legacy) empties it of all but the delivered within minutes.
LEGACY_PRESENT = text("SELECT to_regclass('fp_outbox_events_legacy') IS NOT NULL AS present")
_LEGACY_FIGURES = """
    SELECT (SELECT count(*) FROM fp_outbox_events_legacy WHERE status = 'pending') AS pending,
           (SELECT count(*) FROM fp_outbox_events_legacy WHERE status = 'in_flight') AS in_flight,
           (SELECT count(*) FROM fp_outbox_events_legacy WHERE status = 'dead') AS dead,
           (SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8 FROM fp_outbox_events_legacy
             WHERE status IN ('pending', 'in_flight')) AS oldest_pending_age_s"""
LEGACY_QUEUE_DEPTH = text(_LEGACY_FIGURES)
LEGACY_STATUS_COUNTS = text(_LEGACY_FIGURES + """,
           (SELECT count(*) FROM fp_outbox_events_legacy WHERE status = 'delivered') AS delivered""")

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

# ---------------------------------------------------------------- retention (worker.engine.retention)
# The worker's Retention thread and `fp-outbox purge`. Delivered events go by whole partitions, never by DELETE:
# the event table only ever grows by inserts and shrinks by TRUNCATE, so it leaves no dead tuples to vacuum.

# At the worker's start: the slot period follows --retain-delivered (a slot must be old enough to go before it
# comes round again). A SECURITY DEFINER function of the migrating role: the worker needs no DDL right.
SET_SLOT_PERIOD = text("SELECT fp_outbox_set_slot_period(CAST(:retain_s AS float8)) AS period_s")

# One slot: 'truncated', or why not (current, young, empty: nothing to say; unclaimed, unsettled, busy: old enough
# but kept). Its own transaction; the partition's lock is waited for 200 ms at most (fp_outbox_truncate_slot).
TRUNCATE_SLOT = text("SELECT fp_outbox_truncate_slot(CAST(:slot AS integer), CAST(:retain_s AS float8)) AS outcome")

# How many events each partition holds, as the statistics count them (inserts, no scan): for the log line of a
# truncate, whose count would otherwise cost reading the partition it is about to drop.
SLOT_SIZES = text(
    """
    SELECT substr(relname, length('fp_outbox_events_s') + 1)::int AS slot, n_live_tup AS events
      FROM pg_stat_user_tables
     WHERE schemaname = current_schema() AND relname ~ '^fp_outbox_events_s[0-9]+$'
    """
)

# Where a walk of the claims log starts: its first row (the primary key's first live entry).
FIRST_CLAIM = text("SELECT min(id) AS id FROM fp_outbox_claims")

# The claims log past retention, in id order (claims are written in time order): each batch looks at `batch_size`
# ids from `from_id` and deletes the settled ones settled before the cutoff, never the latest fresh claim (it holds
# the shared position, however old: an idle outbox keeps it). The walk is `done` at a batch that holds a claim
# taken after the cutoff (the rest are younger still), or at the end of the log: its cost follows what it deletes.
# The sum is of bigints: psycopg sends a Python int as the smallest type that holds it (smallint up to 32,767).
PURGE_CLAIMS_BATCH = text(
    """
    WITH latest AS (
        SELECT id FROM fp_outbox_claims WHERE kind = 'fresh' ORDER BY id DESC LIMIT 1),
    doomed AS (
        SELECT id FROM fp_outbox_claims
         WHERE id >= :from_id AND id < CAST(:from_id AS bigint) + CAST(:batch_size AS bigint)
           AND settled_at < now() - make_interval(secs => CAST(:older_than_s AS float8))
           AND id NOT IN (SELECT id FROM latest)
           FOR UPDATE SKIP LOCKED),
    deleted AS (
        DELETE FROM fp_outbox_claims AS c USING doomed WHERE c.id = doomed.id RETURNING c.id)
    SELECT (SELECT count(*) FROM deleted) AS deleted,
           EXISTS (SELECT 1 FROM fp_outbox_claims
                    WHERE id >= :from_id AND id < CAST(:from_id AS bigint) + CAST(:batch_size AS bigint)
                      AND claimed_at >= now() - make_interval(secs => CAST(:older_than_s AS float8)))
           OR NOT EXISTS (SELECT 1 FROM fp_outbox_claims
                           WHERE id >= CAST(:from_id AS bigint) + CAST(:batch_size AS bigint)) AS done
    """
)

# Retries rows delivered at last are kept for their history (attempts, answers) as long as the claims that tell
# it; they wait at next_attempt_at 'infinity', so their own index finds them.
PURGE_DELIVERED_RETRIES_BATCH = text(
    """
    WITH doomed AS (
        SELECT id FROM fp_outbox_retries
         WHERE next_attempt_at = 'infinity'
           AND delivered_at < now() - make_interval(secs => CAST(:older_than_s AS float8))
         LIMIT :batch_size
           FOR UPDATE SKIP LOCKED),
    deleted AS (
        DELETE FROM fp_outbox_retries AS r USING doomed WHERE r.id = doomed.id RETURNING r.id)
    SELECT count(*) AS deleted, count(*) < :batch_size AS done FROM deleted
    """
)

# Dead letters have a retention of their own (--retain-dead); their index on dead_at gives the oldest first.
PURGE_DEAD_BATCH = text(
    """
    WITH doomed AS (
        SELECT id FROM fp_outbox_dead_letters
         WHERE dead_at < now() - make_interval(secs => CAST(:older_than_s AS float8))
         ORDER BY dead_at
         LIMIT :batch_size
           FOR UPDATE SKIP LOCKED),
    deleted AS (
        DELETE FROM fp_outbox_dead_letters AS d USING doomed WHERE d.id = doomed.id RETURNING d.id)
    SELECT count(*) AS deleted, count(*) < :batch_size AS done FROM deleted
    """
)

# ---------------------------------------------------------------- the legacy mover (worker.engine.legacy)
# After the upgrade to 0007 the previous release's table is fp_outbox_events_legacy; the workers move what it still
# holds into the new storage, a short transaction per batch (SKIP LOCKED: any number of workers at once);
# `fp-outbox migrate` drops it once empty (0010). Its trace_context column (revision 0005) is read through the row's JSON, so
# the statements work whichever revision it was made by.

LEGACY_ANY = text("SELECT EXISTS (SELECT 1 FROM fp_outbox_events_legacy) AS any")

# Seconds until the first lease of a row the previous release's worker still holds runs out (NULL: none held): the
# mover runs again then, not a whole retention interval later. From the old table's partial index of unfinished rows.
LEGACY_NEXT_LEASE_END = text(
    "SELECT extract(epoch FROM min(lease_until) - now())::float8 FROM fp_outbox_events_legacy"
    " WHERE status = 'in_flight'")

# Pending rows, and rows in flight whose lease expired (their worker, of the previous release, is gone: its settle
# would meet the new table), become events again, with their id, insert_id, payload and created_at: the fresh path
# claims them as any other. From the old table's partial index of unfinished rows.
LEGACY_MOVE_UNFINISHED = text(
    """
    WITH moved AS (
        DELETE FROM fp_outbox_events_legacy AS l
         WHERE l.id IN (SELECT id FROM fp_outbox_events_legacy
                         WHERE status IN ('pending', 'in_flight') AND (status = 'pending' OR lease_until < now())
                         ORDER BY next_attempt_at
                         LIMIT :batch_size
                           FOR UPDATE SKIP LOCKED)
     RETURNING l.id, l.insert_id, l.event_name, l.payload, l.created_at, to_jsonb(l) ->> 'trace_context' AS trace),
    inserted AS (
        INSERT INTO fp_outbox_events (id, insert_id, event_name, payload, created_at, trace_context)
        SELECT id, insert_id, event_name, payload, created_at, trace FROM moved
     RETURNING 1)
    SELECT count(*) AS moved FROM inserted
    """
)

# Dead rows become dead letters (their answer and when they died kept), from the old table's index of dead rows.
LEGACY_MOVE_DEAD = text(
    """
    WITH moved AS (
        DELETE FROM fp_outbox_events_legacy AS l
         WHERE l.id IN (SELECT id FROM fp_outbox_events_legacy WHERE status = 'dead'
                         ORDER BY dead_at
                         LIMIT :batch_size
                           FOR UPDATE SKIP LOCKED)
     RETURNING l.id, l.insert_id, l.event_name, l.payload, l.created_at, to_jsonb(l) ->> 'trace_context' AS trace,
               l.attempts, l.last_status, l.last_error, coalesce(l.dead_at, now()) AS dead_at),
    inserted AS (
        INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                                            last_status, last_error, dead_at)
        SELECT id, insert_id, event_name, payload, created_at, trace, attempts, last_status, last_error, dead_at
          FROM moved
            ON CONFLICT (id) DO NOTHING
     RETURNING 1)
    SELECT (SELECT count(*) FROM moved) AS moved
    """
)

# Delivered rows are deleted once past --retain-delivered, by a walk over the old primary key (enqueue order; the
# table gets no new rows): each batch looks at `batch_size` rows after `after` and deletes the old delivered ones.
# `first_young` is the first delivered row still too recent: the next walk resumes there.
LEGACY_PURGE_DELIVERED_BATCH = text(
    """
    WITH examined AS (
        SELECT id, status, delivered_at FROM fp_outbox_events_legacy
         WHERE id > :after
         ORDER BY id
         LIMIT :batch_size),
    doomed AS (
        SELECT l.id FROM fp_outbox_events_legacy AS l
         WHERE l.id IN (SELECT id FROM examined WHERE status = 'delivered'
                           AND delivered_at < now() - make_interval(secs => CAST(:older_than_s AS float8)))
           FOR UPDATE SKIP LOCKED),
    deleted AS (
        DELETE FROM fp_outbox_events_legacy AS l USING doomed WHERE l.id = doomed.id RETURNING l.id)
    SELECT (SELECT count(*) FROM deleted) AS deleted, (SELECT max(id) FROM examined) AS last_id,
           (SELECT min(id) FROM examined
             WHERE status = 'delivered'
               AND delivered_at >= now() - make_interval(secs => CAST(:older_than_s AS float8))) AS first_young
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
        UPDATE fp_outbox_retries SET next_attempt_at = now()
         WHERE lease_owner IS NULL AND delivered_at IS NULL AND next_attempt_at > now() AND EXISTS (SELECT 1 FROM up)
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

# What the worker checks at start (worker.engine.lifecycle.check_schema): the schema's revision, and (from 0007 on)
# the oldest worker revision it still works with.
SCHEMA_REVISION = text("SELECT version_num FROM fp_outbox_alembic_version LIMIT 1")
OLDEST_WORKER_REVISION = text("SELECT oldest_worker_revision FROM fp_outbox_schema_compat")
