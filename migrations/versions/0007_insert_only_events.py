"""The outbox costs the application's database one insert: an insert-only event table retired by whole partitions,
delivery state beside it, written by the worker alone.

- fp_outbox_events: insert-only, partitioned by LIST (slot) into SLOTS partitions; the slot is the event's
  transaction's start time divided by a period, modulo SLOTS (fp_outbox_slot(), a SQL function the planner
  inlines into the insert). Its one index is its primary key (txid, id, slot); no CHECK; never updated.
  Retention truncates a whole partition (fp_outbox_truncate_slot).
- fp_outbox_claims: one row per claim (a batch of events), with the shared position of the fresh path (PgQ's
  snapshot windows: a claim takes the events visible in win_hi and not in win_lo, in (txid, id) order after the
  key) and what became of each event (done, delivered, the answers of the failed ones): the delivery log.
- fp_outbox_retries and fp_outbox_dead_letters: per event only where it must be (a failed attempt, an expired
  lease, a released or requeued event; a dead letter), each with a copy of the payload, so no partition waits.

Upgrade under load: the previous release's table is locked (lock_timeout, retried), renamed to
fp_outbox_events_legacy (or dropped, if empty), and the new storage created, in one short transaction. The
previous release's applications keep enqueueing: their INSERT (insert_id, event_name, payload) lands in the new
table. Its workers meet the new table at their next claim and exit 5 in one sentence. The new workers move what
was left in the legacy table (pending rows, expired leases, dead letters) in batches; the next release drops it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SLOTS = 16  # partitions; a slot comes round again after SLOTS periods
#: The advisory lock that makes reading the fresh path's position and writing the next one a single step:
#: b"fpoclaim" as a bigint (the rate limiter's is b"fpoutbox").
CLAIM_LOCK = 0x66706F636C61696D
# After a slot's newest event passes retention, retention has at least this long (and at least a period) to
# truncate it before the slot comes round again: two of its runs (at most a minute apart), so a run that misses it
# (a busy lock) leaves the next one time.
TRUNCATE_WINDOW_S = 120.0
DEFAULT_PERIOD_S = 7 * 86400 / (SLOTS - 2)  # a week's retention (the default): a window of a whole period
LOCK_TRIES, LOCK_TIMEOUT = 30, "2s"  # at most 2 s of enqueues queued behind each try for the old table's lock


def _slot_function(period_s: float) -> str:
    # LANGUAGE sql, one expression, no FROM: inlined into every INSERT's plan, so choosing the partition costs
    # an expression, not a function call. now(): the transaction's start, the same for all its events.
    return f"""
CREATE OR REPLACE FUNCTION fp_outbox_slot() RETURNS smallint LANGUAGE sql STABLE PARALLEL SAFE AS
$$ SELECT ((floor(extract(epoch FROM now()) / {period_s!r}))::bigint % {SLOTS})::smallint $$"""


LOCK_OLD_TABLE = f"""
DO $$
BEGIN
    FOR attempt IN 1..{LOCK_TRIES} LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '{LOCK_TIMEOUT}', true);
            LOCK TABLE fp_outbox_events IN ACCESS EXCLUSIVE MODE;
            PERFORM set_config('lock_timeout', '0', true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            -- a business transaction holds it: enqueues wait behind us only while we wait; let them go
            PERFORM pg_sleep(0.5);
        END;
    END LOOP;
    RAISE EXCEPTION 'fp-outbox migrate: fp_outbox_events stayed locked by other transactions for % tries of %; '
                    'run it again (a long transaction that enqueued is holding it)', {LOCK_TRIES}, '{LOCK_TIMEOUT}';
END $$"""

# Empty (a new install, or a drained outbox): dropped. Otherwise renamed, its constraints, indexes and identity
# sequence too (the new table takes their names), and its views dropped (they are made anew over the new storage).
RETIRE_OLD_TABLE = """
DO $$
BEGIN
    -- who could do what on the old table (the application's and the worker's roles), to grant the same on the new
    CREATE TEMPORARY TABLE fp_outbox_old_grants ON COMMIT DROP AS
        SELECT a.grantee, a.privilege_type AS privilege, NULL::name AS column_name
          FROM pg_class AS c, aclexplode(c.relacl) AS a
         WHERE c.oid = 'fp_outbox_events'::regclass AND a.grantee <> c.relowner
        UNION
        SELECT a.grantee, a.privilege_type, att.attname
          FROM pg_attribute AS att, aclexplode(att.attacl) AS a
         WHERE att.attrelid = 'fp_outbox_events'::regclass AND att.attacl IS NOT NULL;
    DROP VIEW IF EXISTS fp_outbox_stuck, fp_outbox_overdue, fp_outbox_dead, fp_outbox_lag;
    IF NOT EXISTS (SELECT 1 FROM fp_outbox_events) THEN
        CREATE SEQUENCE fp_outbox_event_ids;  -- above every id handed out before, purged ones included
        PERFORM setval('fp_outbox_event_ids', (SELECT last_value FROM fp_outbox_events_id_seq) + 1, false);
        DROP TABLE fp_outbox_events;
        RETURN;
    END IF;
    CREATE SEQUENCE fp_outbox_event_ids;
    -- new ids above every old one: moved rows keep theirs
    PERFORM setval('fp_outbox_event_ids', (SELECT max(id) FROM fp_outbox_events) + 1, false);
    ALTER TABLE fp_outbox_events RENAME TO fp_outbox_events_legacy;
    ALTER TABLE fp_outbox_events_legacy RENAME CONSTRAINT fp_outbox_events_pkey TO fp_outbox_events_legacy_pkey;
    ALTER TABLE fp_outbox_events_legacy RENAME CONSTRAINT fp_outbox_events_status_check
        TO fp_outbox_events_legacy_status_check;
    ALTER INDEX fp_outbox_events_due_idx RENAME TO fp_outbox_events_legacy_due_idx;
    ALTER INDEX fp_outbox_events_dead_idx RENAME TO fp_outbox_events_legacy_dead_idx;
    ALTER SEQUENCE fp_outbox_events_id_seq RENAME TO fp_outbox_events_legacy_id_seq;
END $$"""

CREATE = [
    # The period behind fp_outbox_slot(), and since when: retention's arithmetic needs both.
    "CREATE TABLE fp_outbox_slot_period (id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),"
    " period_s float8 NOT NULL, since timestamptz NOT NULL DEFAULT now())",
    f"INSERT INTO fp_outbox_slot_period (period_s) VALUES ({DEFAULT_PERIOD_S!r})",
    _slot_function(DEFAULT_PERIOD_S),
    """
    CREATE TABLE fp_outbox_events (
        id bigint GENERATED BY DEFAULT AS IDENTITY,  -- an identity: inserting needs no grant on a sequence
        txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        slot smallint NOT NULL DEFAULT fp_outbox_slot(),
        insert_id text NOT NULL,
        event_name text NOT NULL,
        payload json NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        trace_context text,
        CONSTRAINT fp_outbox_events_pkey PRIMARY KEY (txid, id, slot)
    ) PARTITION BY LIST (slot)""",
    # new ids above every old one (moved rows keep theirs)
    "SELECT setval(pg_get_serial_sequence('fp_outbox_events', 'id'), nextval('fp_outbox_event_ids'), false)",
    "DROP SEQUENCE fp_outbox_event_ids",
    *[f"CREATE TABLE fp_outbox_events_s{n:02d} PARTITION OF fp_outbox_events FOR VALUES IN ({n})"
      for n in range(SLOTS)],
    """
    CREATE TABLE fp_outbox_claims (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        kind text NOT NULL,                       -- 'fresh' (from the events) or 'due' (from the retries)
        owner text NOT NULL,
        claimed_at timestamptz NOT NULL DEFAULT now(),
        lease_until timestamptz NOT NULL,
        ids bigint[] NOT NULL,
        txids xid8[] NOT NULL DEFAULT '{}',       -- fresh: with ids, each event's primary key (emptied once settled)
        slots smallint[] NOT NULL DEFAULT '{}',   -- fresh: the partitions its events are in
        done bigint[] NOT NULL DEFAULT '{}',      -- settled so far, whatever the outcome
        delivered integer NOT NULL DEFAULT 0,
        failed_ids bigint[] NOT NULL DEFAULT '{}',  -- with the two below: each failed attempt's answer
        failed_statuses smallint[] NOT NULL DEFAULT '{}',
        failed_errors text[] NOT NULL DEFAULT '{}',
        settled_at timestamptz,                   -- every event done (or the lease expired: expired)
        expired boolean NOT NULL DEFAULT false,
        win_lo pg_snapshot, win_hi pg_snapshot, key_txid xid8, key_id bigint  -- fresh: the position after it
    )""",
    # Unsettled claims: in flight, or expired (their worker died); few, and read at every sweep.
    "CREATE INDEX fp_outbox_claims_open_idx ON fp_outbox_claims (lease_until) WHERE settled_at IS NULL",
    # Claims are written in time order: a BRIN index (a few pages for the whole log) finds those of a time span
    # (an event's history from its enqueue on, the last minute's deliveries, the claims past retention) without
    # reading the log, at no cost to the claim worth measuring. Summarised as each range fills.
    "CREATE INDEX fp_outbox_claims_claimed_at_idx ON fp_outbox_claims USING brin (claimed_at)"
    " WITH (pages_per_range = 16, autosummarize = on)",
    """
    CREATE TABLE fp_outbox_retries (
        id bigint PRIMARY KEY,
        insert_id text NOT NULL,
        event_name text NOT NULL,
        payload json NOT NULL,
        created_at timestamptz NOT NULL,
        trace_context text,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),  -- while leased: lease_until (as the old table)
        lease_owner text,
        lease_until timestamptz,
        last_status smallint,
        last_error text,
        delivered_at timestamptz  -- delivered at last (next_attempt_at 'infinity'): kept for its history
    )""",
    "CREATE INDEX fp_outbox_retries_due_idx ON fp_outbox_retries (next_attempt_at)",
    """
    CREATE TABLE fp_outbox_dead_letters (
        id bigint PRIMARY KEY,
        insert_id text NOT NULL,
        event_name text NOT NULL,
        payload json NOT NULL,
        created_at timestamptz NOT NULL,
        trace_context text,
        attempts integer NOT NULL,
        last_status smallint,
        last_error text,
        dead_at timestamptz NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX fp_outbox_dead_letters_dead_at_idx ON fp_outbox_dead_letters (dead_at)",
    # What a worker of this schema must understand; a newer schema raises it only when it breaks older workers.
    "CREATE TABLE fp_outbox_schema_compat (id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),"
    " revision text NOT NULL, oldest_worker_revision text NOT NULL)",
    "INSERT INTO fp_outbox_schema_compat (revision, oldest_worker_revision) VALUES ('0007', '0007')",
    f"""
    CREATE FUNCTION fp_outbox_claim_fresh(p_owner text, p_lease_s float8, p_limit integer, p_probe boolean)
    RETURNS TABLE (claim_id bigint, id bigint, txid xid8, slot smallint, insert_id text, payload text,
                   created_at timestamptz, trace_context text)
    LANGUAGE plpgsql
    -- Its reads are ranges of the primary key in order, to stop after a chunk: a planner that estimates a window
    -- at a third of the table would read it all and sort it (tests/test_schema.py counts what a claim reads).
    -- No JIT: the costs those settings add to any plan that still sorts (a handful of slots) would pass JIT's
    -- threshold, and compiling took 100 ms of a claim that otherwise takes a millisecond.
    SET enable_sort = off SET enable_bitmapscan = off SET enable_seqscan = off SET jit = off
    AS $fn$
    #variable_conflict use_column
    DECLARE
        v_lo pg_snapshot; v_hi pg_snapshot; v_kt xid8; v_ki bigint; x xid8;
        v_ids bigint[] := '{{}}'; v_txids xid8[] := '{{}}'; v_slots smallint[] := '{{}}'; v_iids text[] := '{{}}';
        v_payloads text[] := '{{}}'; v_created timestamptz[] := '{{}}'; v_traces text[] := '{{}}';
        v_claim bigint; r record;
    BEGIN
        IF NOT p_probe AND EXISTS (SELECT 1 FROM fp_outbox_endpoint WHERE down_since IS NOT NULL) THEN
            RETURN;  -- an outage: nothing but the probe
        END IF;
        PERFORM pg_advisory_xact_lock({CLAIM_LOCK});  -- one position: read it and write the next as one step
        SELECT c.win_lo, c.win_hi, c.key_txid, c.key_id INTO v_lo, v_hi, v_kt, v_ki
          FROM fp_outbox_claims AS c WHERE c.kind = 'fresh' ORDER BY c.id DESC LIMIT 1;
        IF v_lo IS NULL THEN  -- the first claim: nothing was claimed before
            v_lo := '1:1:'; v_hi := pg_current_snapshot(); v_kt := '0'; v_ki := 0;
        END IF;
        FOR pass IN 1..2 LOOP
            -- The window's transactions that were running at win_lo and had committed by win_hi, one at a time in
            -- txid order; then those that began after win_lo. Each a range of the primary key read in order from
            -- the key: never what was claimed before, never a sort of the backlog.
            FOR x IN SELECT t FROM pg_snapshot_xip(v_lo) AS t
                      WHERE pg_visible_in_snapshot(t, v_hi) AND t >= v_kt ORDER BY t LOOP
                EXIT WHEN cardinality(v_ids) >= p_limit;
                FOR r IN SELECT e.id, e.txid, e.slot, e.insert_id, e.payload::text AS payload, e.created_at,
                                e.trace_context
                           FROM fp_outbox_events AS e
                          WHERE e.txid = x AND (e.txid, e.id) > (v_kt, v_ki)
                          ORDER BY e.txid, e.id
                          LIMIT p_limit - cardinality(v_ids) LOOP
                    v_ids := v_ids || r.id; v_txids := v_txids || r.txid; v_slots := v_slots || r.slot;
                    v_iids := v_iids || r.insert_id; v_payloads := v_payloads || r.payload;
                    v_created := v_created || r.created_at; v_traces := v_traces || r.trace_context;
                    v_kt := r.txid; v_ki := r.id;
                END LOOP;
            END LOOP;
            IF cardinality(v_ids) < p_limit THEN
                FOR r IN SELECT e.id, e.txid, e.slot, e.insert_id, e.payload::text AS payload, e.created_at,
                                e.trace_context
                           FROM fp_outbox_events AS e
                          WHERE e.txid >= greatest(pg_snapshot_xmax(v_lo), v_kt) AND e.txid < pg_snapshot_xmax(v_hi)
                            AND (e.txid, e.id) > (v_kt, v_ki) AND pg_visible_in_snapshot(e.txid, v_hi)
                          ORDER BY e.txid, e.id
                          LIMIT p_limit - cardinality(v_ids) LOOP
                    v_ids := v_ids || r.id; v_txids := v_txids || r.txid; v_slots := v_slots || r.slot;
                    v_iids := v_iids || r.insert_id; v_payloads := v_payloads || r.payload;
                    v_created := v_created || r.created_at; v_traces := v_traces || r.trace_context;
                    v_kt := r.txid; v_ki := r.id;
                END LOOP;
            END IF;
            EXIT WHEN cardinality(v_ids) >= p_limit OR pass = 2;
            -- this window is done: the next starts where it ended
            v_lo := v_hi; v_hi := pg_current_snapshot(); v_kt := '0'; v_ki := 0;
        END LOOP;
        IF cardinality(v_ids) = 0 THEN
            RETURN;  -- nothing: the position stays (the next claim's window reaches further)
        END IF;
        INSERT INTO fp_outbox_claims (kind, owner, lease_until, ids, txids, slots, win_lo, win_hi, key_txid, key_id)
        VALUES ('fresh', p_owner, now() + make_interval(secs => p_lease_s), v_ids, v_txids,
                ARRAY(SELECT DISTINCT s FROM unnest(v_slots) AS s ORDER BY s), v_lo, v_hi, v_kt, v_ki)
        RETURNING fp_outbox_claims.id INTO v_claim;
        RETURN QUERY SELECT v_claim, u.id, u.txid, u.slot, u.iid, u.payload, u.created, u.trace
                       FROM unnest(v_ids, v_txids, v_slots, v_iids, v_payloads, v_created, v_traces)
                            AS u(id, txid, slot, iid, payload, created, trace);
    END $fn$""",
    # Retention's period follows --retain-delivered: a slot is truncated once its newest event is past it, and
    # must be empty again before it comes round (SLOTS periods after its own began): (SLOTS - 1) periods must hold
    # the retention and a window of a period, at least TRUNCATE_WINDOW_S, else a slot whose window retention missed
    # takes a second period's events and waits a whole round more. Owned by the migrating role, so the worker's role needs no DDL rights. Returns
    # the period in effect.
    f"""
    CREATE FUNCTION fp_outbox_set_slot_period(p_retain_s float8) RETURNS float8
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $fn$
    DECLARE
        v_want float8 := greatest(10.0, p_retain_s / {SLOTS - 2}, (p_retain_s + {TRUNCATE_WINDOW_S}) / {SLOTS - 1});
        v_have float8;
    BEGIN
        SELECT period_s INTO v_have FROM fp_outbox_slot_period FOR UPDATE;
        IF v_have BETWEEN v_want AND 2 * v_want THEN
            RETURN v_have;  -- close enough: a new period mixes events of two periods in a slot for a round
        END IF;
        EXECUTE format($f$CREATE OR REPLACE FUNCTION fp_outbox_slot() RETURNS smallint LANGUAGE sql STABLE
            PARALLEL SAFE AS 'SELECT ((floor(extract(epoch FROM now()) / %s))::bigint %% {SLOTS})::smallint'$f$,
            v_want);
        UPDATE fp_outbox_slot_period SET period_s = v_want, since = now();
        RETURN v_want;
    END $fn$""",
    # Truncates one slot's partition if it may go: not the current slot; its newest event past p_retain_s (by the
    # period's arithmetic: every event in a slot began its transaction in one of that slot's periods, or before
    # the period last changed); every event in it claimed by the position and no unsettled claim listing it. Taken
    # with a short lock_timeout: a transaction still writing it (begun in its period) keeps it ('busy'). Once the
    # lock is held nobody writes the partition, so 'claimed' is read exactly as the claim reads the position: no
    # event in the window's stragglers (running at win_lo) or past the window's key, from the primary key; not
    # 'below the position's xmin', which any long writing transaction on the cluster would hold back for hours.
    f"""
    CREATE FUNCTION fp_outbox_truncate_slot(p_slot integer, p_retain_s float8) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $fn$
    DECLARE
        v_period float8; v_since float8; v_now float8 := extract(epoch FROM now());
        v_cur bigint; v_last bigint; v_part text := format('fp_outbox_events_s%s', lpad(p_slot::text, 2, '0'));
        v_any boolean; v_lo pg_snapshot; v_hi pg_snapshot; v_kt xid8; v_ki bigint;
    BEGIN
        SELECT period_s, extract(epoch FROM since) INTO v_period, v_since FROM fp_outbox_slot_period;
        v_cur := floor(v_now / v_period)::bigint;
        IF v_cur % {SLOTS} = p_slot THEN
            RETURN 'current';
        END IF;
        v_last := v_cur - ((v_cur - p_slot) % {SLOTS} + {SLOTS}) % {SLOTS};
        IF greatest((v_last + 1) * v_period, v_since) + p_retain_s > v_now THEN
            RETURN 'young';
        END IF;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I)', v_part) INTO v_any;
        IF NOT v_any THEN
            RETURN 'empty';
        END IF;
        PERFORM set_config('lock_timeout', '200ms', true);
        BEGIN
            EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', v_part);
        EXCEPTION WHEN lock_not_available THEN
            RETURN 'busy';
        END;
        SELECT c.win_lo, c.win_hi, c.key_txid, c.key_id INTO v_lo, v_hi, v_kt, v_ki
          FROM fp_outbox_claims AS c WHERE c.kind = 'fresh' ORDER BY c.id DESC LIMIT 1;
        IF v_lo IS NULL THEN
            RETURN 'unclaimed';
        END IF;
        EXECUTE format($q$
            SELECT EXISTS (SELECT 1 FROM %1$I AS e WHERE e.txid = ANY (ARRAY(SELECT pg_snapshot_xip($1)))
                              AND NOT (pg_visible_in_snapshot(e.txid, $2) AND (e.txid, e.id) <= ($3, $4)))
                OR EXISTS (SELECT 1 FROM %1$I AS e WHERE e.txid >= pg_snapshot_xmax($1) AND (e.txid, e.id) > ($3, $4))
                OR EXISTS (SELECT 1 FROM %1$I AS e WHERE e.txid = ANY (ARRAY(SELECT pg_snapshot_xip($2)))
                              AND e.txid >= pg_snapshot_xmax($1))$q$, v_part)
            USING v_lo, v_hi, v_kt, v_ki INTO v_any;
        IF v_any THEN
            RETURN 'unclaimed';
        END IF;
        IF EXISTS (SELECT 1 FROM fp_outbox_claims WHERE settled_at IS NULL AND p_slot = ANY (slots)) THEN
            RETURN 'unsettled';
        END IF;
        EXECUTE format('TRUNCATE %I', v_part);
        RETURN 'truncated';
    END $fn$""",
]

# One row per event: status pending, in_flight, delivered or dead, as the operator's questions need it. An event
# is 'claimed' once the fresh path's position has passed it: visible in win_lo, or in the window up to the key.
_STATES = """
    WITH pos AS (
        SELECT win_lo, win_hi, key_txid, key_id FROM fp_outbox_claims WHERE kind = 'fresh' ORDER BY id DESC LIMIT 1),
    open AS (
        SELECT u.id, c.owner, c.lease_until
          FROM fp_outbox_claims AS c, unnest(c.ids) AS u(id)
         WHERE c.settled_at IS NULL AND c.kind = 'fresh' AND u.id <> ALL (c.done))
    SELECT e.id, e.insert_id, e.event_name,
           CASE WHEN o.id IS NOT NULL THEN 'in_flight'
                WHEN pg_visible_in_snapshot(e.txid, p.win_lo)
                     OR (pg_visible_in_snapshot(e.txid, p.win_hi) AND (e.txid, e.id) <= (p.key_txid, p.key_id))
                THEN 'delivered' ELSE 'pending' END AS status,
           CASE WHEN o.id IS NOT NULL OR pg_visible_in_snapshot(e.txid, p.win_lo)
                     OR (pg_visible_in_snapshot(e.txid, p.win_hi) AND (e.txid, e.id) <= (p.key_txid, p.key_id))
                THEN 1 ELSE 0 END AS attempts,
           NULL::timestamptz AS next_attempt_at, o.owner AS lease_owner, o.lease_until,
           NULL::smallint AS last_status, NULL::text AS last_error, e.created_at, NULL::timestamptz AS dead_at,
           e.payload
      FROM fp_outbox_events AS e
      LEFT JOIN pos AS p ON true
      LEFT JOIN open AS o ON o.id = e.id
     WHERE NOT EXISTS (SELECT 1 FROM fp_outbox_retries AS r WHERE r.id = e.id)
       AND NOT EXISTS (SELECT 1 FROM fp_outbox_dead_letters AS d WHERE d.id = e.id)
    UNION ALL
    SELECT r.id, r.insert_id, r.event_name,
           CASE WHEN r.delivered_at IS NOT NULL THEN 'delivered' WHEN r.lease_owner IS NULL THEN 'pending'
                ELSE 'in_flight' END,
           r.attempts, CASE WHEN r.delivered_at IS NULL THEN r.next_attempt_at END, r.lease_owner, r.lease_until,
           r.last_status, r.last_error, r.created_at, NULL::timestamptz, r.payload
      FROM fp_outbox_retries AS r
    UNION ALL
    SELECT d.id, d.insert_id, d.event_name, 'dead', d.attempts, NULL, NULL, NULL, d.last_status, d.last_error,
           d.created_at, d.dead_at, d.payload
      FROM fp_outbox_dead_letters AS d"""

# The legacy table's rows (moved out by the workers, its delivered ones kept for their retention), while it is there.
_LEGACY_STATES = """
    UNION ALL
    SELECT l.id, l.insert_id, l.event_name, l.status, l.attempts, l.next_attempt_at, l.lease_owner, l.lease_until,
           l.last_status, l.last_error, l.created_at, l.dead_at, l.payload
      FROM fp_outbox_events_legacy AS l"""

# The events not finished (pending or in flight), each part read from an index, so the operator's views cost what
# is waiting, not what is kept: the events past the position, found as the claim finds them (the window's
# stragglers, then from the key on, then what was running at win_hi, all from the primary key); the events of
# unsettled fresh claims (the claims' partial index, then each event by its primary key); the retries not
# delivered. The same rows, with the same status, as fp_outbox_event_states. Each txid range has both ends, so
# the planner (which cannot see the position) takes it for a narrow one and reads the primary key.
_UNFINISHED = """
    WITH pos AS MATERIALIZED (
        SELECT win_lo, win_hi, key_txid, key_id FROM fp_outbox_claims WHERE kind = 'fresh' ORDER BY id DESC LIMIT 1),
    past AS (
        SELECT e.* FROM fp_outbox_events AS e
         WHERE e.txid >= (SELECT pg_snapshot_xmin(win_lo) FROM pos)
           AND e.txid < (SELECT pg_snapshot_xmax(win_lo) FROM pos)
           AND e.txid = ANY (ARRAY(SELECT pg_snapshot_xip(win_lo) FROM pos))
           AND NOT (pg_visible_in_snapshot(e.txid, (SELECT win_hi FROM pos))
                    AND (e.txid, e.id) <= ((SELECT key_txid FROM pos), (SELECT key_id FROM pos)))
        UNION ALL
        SELECT e.* FROM fp_outbox_events AS e
         WHERE e.txid >= coalesce((SELECT pg_snapshot_xmax(win_lo) FROM pos), '0')
           AND e.txid < pg_snapshot_xmax(pg_current_snapshot())
           AND (e.txid, e.id) > (coalesce((SELECT key_txid FROM pos), '0'), coalesce((SELECT key_id FROM pos), 0))
           AND coalesce(pg_visible_in_snapshot(e.txid, (SELECT win_hi FROM pos))
                        OR e.txid >= (SELECT pg_snapshot_xmax(win_hi) FROM pos), true)
        UNION ALL
        SELECT e.* FROM fp_outbox_events AS e
         WHERE e.txid >= (SELECT pg_snapshot_xmax(win_lo) FROM pos)
           AND e.txid < (SELECT pg_snapshot_xmax(win_hi) FROM pos)
           AND e.txid = ANY (ARRAY(SELECT pg_snapshot_xip(win_hi) FROM pos)))
    SELECT e.id, e.insert_id, e.event_name, 'pending'::text AS status, 0 AS attempts,
           NULL::timestamptz AS next_attempt_at, NULL::text AS lease_owner, NULL::timestamptz AS lease_until,
           NULL::smallint AS last_status, NULL::text AS last_error, e.created_at
      FROM past AS e
     WHERE NOT EXISTS (SELECT 1 FROM fp_outbox_retries AS r WHERE r.id = e.id)
       AND NOT EXISTS (SELECT 1 FROM fp_outbox_dead_letters AS d WHERE d.id = e.id)
    UNION ALL
    SELECT e.id, e.insert_id, e.event_name, 'in_flight', 1, NULL, c.owner, c.lease_until, NULL, NULL, e.created_at
      FROM fp_outbox_claims AS c
     CROSS JOIN LATERAL unnest(c.ids, c.txids) AS u(id, txid)
      JOIN fp_outbox_events AS e ON e.txid = u.txid AND e.id = u.id
     WHERE c.settled_at IS NULL AND c.kind = 'fresh' AND u.id <> ALL (c.done)
       AND NOT EXISTS (SELECT 1 FROM fp_outbox_retries AS r WHERE r.id = e.id)
       AND NOT EXISTS (SELECT 1 FROM fp_outbox_dead_letters AS d WHERE d.id = e.id)
    UNION ALL
    SELECT r.id, r.insert_id, r.event_name, CASE WHEN r.lease_owner IS NULL THEN 'pending' ELSE 'in_flight' END,
           r.attempts, r.next_attempt_at, r.lease_owner, r.lease_until, r.last_status, r.last_error, r.created_at
      FROM fp_outbox_retries AS r
     WHERE r.delivered_at IS NULL"""

# While the previous release's table is there: its unfinished rows (from its partial index), until moved.
_LEGACY_UNFINISHED = """
    UNION ALL
    SELECT l.id, l.insert_id, l.event_name, l.status, l.attempts, l.next_attempt_at, l.lease_owner, l.lease_until,
           l.last_status, l.last_error, l.created_at
      FROM fp_outbox_events_legacy AS l
     WHERE l.status IN ('pending', 'in_flight')"""

# Delivered: the deliveries the claims log records (fp_outbox_claims.delivered, one row per claim; its rows are
# kept for --retain-delivered), so counting them reads the log, not the events; the age is the oldest such claim's.
_DELIVERED = """
        SELECT 'delivered' AS status, coalesce(sum(delivered), 0)::bigint AS count,
               extract(epoch FROM now() - min(claimed_at) FILTER (WHERE delivered > 0))::float8 AS oldest_age_s
          FROM fp_outbox_claims"""
_LEGACY_DELIVERED_DEAD = """
        UNION ALL
        SELECT status, count(*), extract(epoch FROM now() - min(created_at))::float8
          FROM fp_outbox_events_legacy WHERE status IN ('delivered', 'dead') GROUP BY status"""


def _views(legacy: bool) -> dict[str, str]:
    """The operator's views (docs/operations.md), over the new storage and, while it is there, the legacy table."""
    unfinished = f"({_UNFINISHED}{_LEGACY_UNFINISHED if legacy else ''}) AS u"
    return {
        "fp_outbox_stuck": f"""
            SELECT id, insert_id, event_name, attempts, lease_owner, lease_until,
                   extract(epoch FROM now() - lease_until)::float8 AS lease_expired_s, last_status, last_error,
                   created_at
              FROM {unfinished} WHERE status = 'in_flight' AND lease_until < now()""",
        "fp_outbox_overdue": f"""
            SELECT id, insert_id, event_name, attempts, coalesce(next_attempt_at, created_at) AS next_attempt_at,
                   extract(epoch FROM now() - coalesce(next_attempt_at, created_at))::float8 AS overdue_s,
                   last_status, last_error, created_at
              FROM {unfinished}
             WHERE status = 'pending' AND coalesce(next_attempt_at, created_at) < now() - interval '1 minute'""",
        "fp_outbox_dead": """
            SELECT id, insert_id, event_name, attempts, last_status, last_error, dead_at, created_at
              FROM fp_outbox_dead_letters""",
        "fp_outbox_lag": f"""
            SELECT s.status, coalesce(sum(c.count), 0)::bigint AS count, min(c.oldest_age_s) AS oldest_age_s
              FROM (VALUES (1, 'pending'), (2, 'in_flight'), (3, 'delivered'), (4, 'dead')) AS s(ord, status)
              LEFT JOIN (
                SELECT status, count(*) AS count, extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_s
                  FROM {unfinished} GROUP BY status
                UNION ALL {_DELIVERED}
                UNION ALL
                SELECT 'dead', count(*), extract(epoch FROM now() - min(created_at))::float8
                  FROM fp_outbox_dead_letters{_LEGACY_DELIVERED_DEAD if legacy else ''}) AS c ON c.status = s.status
             GROUP BY s.ord, s.status ORDER BY s.ord""",
    }


VIEWS = _views(legacy=False)


def _create_views(legacy: bool) -> str:
    return "".join(f"EXECUTE $v$CREATE VIEW {name} AS {body}$v$;\n" for name, body in _views(legacy).items())


# The grants of the old table, carried over: a role that could insert events (all of them, or some columns) may
# insert them into the new table (the columns it has there); a role that could read them may read every table of
# the outbox and its views (the admin commands); a role that could change them (the worker's) may also claim,
# settle and retire: the claims, retries and dead letters, and read the events (and insert the old table's rows).
CARRY_GRANTS = """
DO $$
DECLARE
    g record;
    readable text := 'fp_outbox_events, fp_outbox_claims, fp_outbox_retries, fp_outbox_dead_letters, '
                     'fp_outbox_slot_period, fp_outbox_schema_compat, fp_outbox_event_states, fp_outbox_stuck, '
                     'fp_outbox_overdue, fp_outbox_dead, fp_outbox_lag, fp_outbox_alembic_version';
BEGIN
    FOR g IN SELECT DISTINCT grantee, privilege, column_name FROM fp_outbox_old_grants LOOP
        IF g.privilege = 'INSERT' AND g.column_name IS NULL THEN
            EXECUTE format('GRANT INSERT ON fp_outbox_events TO %s', fp_outbox_role(g.grantee));
        ELSIF g.privilege = 'INSERT' AND g.column_name IN ('insert_id', 'event_name', 'payload', 'trace_context',
                                                            'created_at') THEN
            EXECUTE format('GRANT INSERT (%I) ON fp_outbox_events TO %s', g.column_name, fp_outbox_role(g.grantee));
        ELSIF g.privilege = 'SELECT' AND g.column_name IS NULL THEN
            EXECUTE format('GRANT SELECT ON %s TO %s', readable, fp_outbox_role(g.grantee));
        ELSIF g.privilege IN ('UPDATE', 'DELETE') AND g.column_name IS NULL THEN
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON fp_outbox_claims, fp_outbox_retries, '
                           'fp_outbox_dead_letters TO %s', fp_outbox_role(g.grantee));
            -- the workers move what the old table still holds into the new one (worker.engine.retention)
            EXECUTE format('GRANT INSERT ON fp_outbox_events TO %s', fp_outbox_role(g.grantee));
            EXECUTE format('GRANT SELECT ON %s TO %s', readable, fp_outbox_role(g.grantee));
        END IF;
    END LOOP;
END $$"""

# A grantee as GRANT names it: a role's quoted name, or PUBLIC (oid 0).
ROLE_NAME = """
CREATE FUNCTION pg_temp.fp_outbox_role(r oid) RETURNS text LANGUAGE sql AS
$$ SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END $$"""

CREATE_VIEWS = f"""
DO $$
BEGIN
    EXECUTE 'CREATE VIEW fp_outbox_event_states AS ' || $v${_STATES}$v$
         || CASE WHEN to_regclass('fp_outbox_events_legacy') IS NULL THEN '' ELSE $v${_LEGACY_STATES}$v$ END;
    IF to_regclass('fp_outbox_events_legacy') IS NULL THEN
        {_create_views(legacy=False)}
    ELSE
        {_create_views(legacy=True)}
    END IF;
END $$"""

REFUSE_DOWNGRADE_WITH_EVENTS = """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM fp_outbox_events) OR EXISTS (SELECT 1 FROM fp_outbox_retries WHERE delivered_at IS NULL)
       OR EXISTS (SELECT 1 FROM fp_outbox_dead_letters) THEN
        RAISE EXCEPTION 'fp-outbox: downgrading below 0007 with events in the new storage would lose them; '
                        'drain and purge first (fp-outbox status shows what is left)';
    END IF;
END $$"""

DROP = [
    *[f"DROP VIEW IF EXISTS {name}" for name in VIEWS],
    "DROP VIEW IF EXISTS fp_outbox_event_states",
    "DROP FUNCTION fp_outbox_truncate_slot(integer, float8)",
    "DROP FUNCTION fp_outbox_set_slot_period(float8)",
    "DROP FUNCTION fp_outbox_claim_fresh(text, float8, integer, boolean)",
    "DROP TABLE fp_outbox_schema_compat",
    "DROP TABLE fp_outbox_dead_letters",
    "DROP TABLE fp_outbox_retries",
    "DROP TABLE fp_outbox_claims",
    "DROP TABLE fp_outbox_events",
    "DROP FUNCTION fp_outbox_slot()",
    "DROP TABLE fp_outbox_slot_period",
]

# Back to 0006: the legacy table under its old name, or an empty one as 0001-0006 made it.
RESTORE_OLD_TABLE = """
DO $$
BEGIN
    IF to_regclass('fp_outbox_events_legacy') IS NOT NULL THEN
        ALTER TABLE fp_outbox_events_legacy RENAME TO fp_outbox_events;
        ALTER TABLE fp_outbox_events RENAME CONSTRAINT fp_outbox_events_legacy_pkey TO fp_outbox_events_pkey;
        ALTER TABLE fp_outbox_events RENAME CONSTRAINT fp_outbox_events_legacy_status_check
            TO fp_outbox_events_status_check;
        ALTER INDEX fp_outbox_events_legacy_due_idx RENAME TO fp_outbox_events_due_idx;
        ALTER INDEX fp_outbox_events_legacy_dead_idx RENAME TO fp_outbox_events_dead_idx;
        ALTER SEQUENCE fp_outbox_events_legacy_id_seq RENAME TO fp_outbox_events_id_seq;
    ELSE
        CREATE TABLE fp_outbox_events (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, insert_id text NOT NULL,
            event_name text NOT NULL, payload json NOT NULL, status text NOT NULL DEFAULT 'pending',
            attempts integer NOT NULL DEFAULT 0, next_attempt_at timestamptz NOT NULL DEFAULT now(),
            lease_owner text, lease_until timestamptz, last_status smallint, last_error text,
            created_at timestamptz NOT NULL DEFAULT now(), delivered_at timestamptz, dead_at timestamptz,
            CONSTRAINT fp_outbox_events_status_check CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead')));
        CREATE INDEX fp_outbox_events_due_idx ON fp_outbox_events (next_attempt_at)
            WHERE status IN ('pending', 'in_flight');
        CREATE INDEX fp_outbox_events_dead_idx ON fp_outbox_events (dead_at) WHERE status = 'dead';
    END IF;
    CREATE VIEW fp_outbox_stuck AS
        SELECT id, insert_id, event_name, attempts, lease_owner, lease_until,
               extract(epoch FROM now() - lease_until)::float8 AS lease_expired_s, last_status, last_error, created_at
          FROM fp_outbox_events WHERE status = 'in_flight' AND lease_until < now();
    CREATE VIEW fp_outbox_overdue AS
        SELECT id, insert_id, event_name, attempts, next_attempt_at,
               extract(epoch FROM now() - next_attempt_at)::float8 AS overdue_s, last_status, last_error, created_at
          FROM fp_outbox_events WHERE status = 'pending' AND next_attempt_at < now() - interval '1 minute';
    CREATE VIEW fp_outbox_dead AS
        SELECT id, insert_id, event_name, attempts, last_status, last_error, dead_at, created_at
          FROM fp_outbox_events WHERE status = 'dead';
    CREATE VIEW fp_outbox_lag AS
        SELECT s.status, count(e.id) AS count, extract(epoch FROM now() - min(e.created_at))::float8 AS oldest_age_s
          FROM (VALUES (1, 'pending'), (2, 'in_flight'), (3, 'delivered'), (4, 'dead')) AS s(ord, status)
          LEFT JOIN fp_outbox_events AS e ON e.status = s.status
         GROUP BY s.ord, s.status ORDER BY s.ord;
END $$"""


def upgrade() -> None:
    op.execute(LOCK_OLD_TABLE)
    op.execute(RETIRE_OLD_TABLE)
    for statement in CREATE:
        op.execute(statement)
    op.execute(CREATE_VIEWS)
    op.execute(ROLE_NAME)
    op.execute(CARRY_GRANTS.replace("fp_outbox_role(", "pg_temp.fp_outbox_role("))


def downgrade() -> None:
    op.execute(REFUSE_DOWNGRADE_WITH_EVENTS)
    for statement in DROP:
        op.execute(statement)
    op.execute(RESTORE_OLD_TABLE)
