"""Contract 0007's expand: the previous storage's table, fp_outbox_events_legacy, is dropped once it is empty.

0007 renamed the table of 0001-0006 to fp_outbox_events_legacy (or dropped it, if empty), and the workers since then
move what it held into the insert-only storage (worker/engine/legacy.py): pending rows and expired leases at once,
dead rows into the dead letters, delivered rows kept for --retain-delivered and then purged. Once it holds nothing
it is only a name the workers look up at each retention run and a branch in each operator's view. This revision
drops it, if it is there and empty:

- fp_outbox_drop_legacy_if_empty() asks for its lock under lock_timeout 2 s with retries (only the workers' mover and
  the views read it; no application writes it since 0007) and checks it for rows under that lock: a table that still
  holds rows is left as it is. This upgrade runs it, and so does every `fp-outbox migrate` from now on
  (outbox.db.upgrade), so a table the workers empty later goes at the next migrate;
- the operator's views (fp_outbox_event_states, _stuck, _overdue, _dead, _lag) are replaced by 0007's own bodies for
  a schema without it, with CREATE OR REPLACE VIEW: the same columns, so their owner and grants stay;
- then the table, its indexes and its sequence go.

Expand-compatible for the previous releases (0007-0009): their workers find the table missing as they would after
0007 on an empty table. The downgrade drops only the function: a 0009 schema without the legacy table is one 0007 makes.
Bodies copied from 0007 (migrations are frozen and do not import one another).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

LOCK_TRIES, LOCK_TIMEOUT = 30, "2s"  # as 0007-0009

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

_DELIVERED = """
        SELECT 'delivered' AS status, coalesce(sum(delivered), 0)::bigint AS count,
               extract(epoch FROM now() - min(claimed_at) FILTER (WHERE delivered > 0))::float8 AS oldest_age_s
          FROM fp_outbox_claims"""


def _views() -> dict[str, str]:
    """The operator's views (docs/operations.md) over the insert-only storage alone: 0007's, without the legacy parts."""
    unfinished = f"({_UNFINISHED}) AS u"
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
                  FROM fp_outbox_dead_letters) AS c ON c.status = s.status
             GROUP BY s.ord, s.status ORDER BY s.ord""",
    }


def _replace_views() -> str:
    return "".join(f"EXECUTE $v$CREATE OR REPLACE VIEW {name} AS {body}$v$;\n" for name, body in _views().items())


# Drops the legacy table if it is there and empty: 'dropped', 'kept' (it holds rows) or 'absent'. Created here and
# run by this upgrade, and by every `fp-outbox migrate` after it (outbox.db.upgrade), so a table the workers empty
# later goes at the next migrate. Dynamic SQL throughout: no plan of it outlives the table.
DROP_LEGACY_IF_EMPTY = f"""
CREATE FUNCTION fp_outbox_drop_legacy_if_empty() RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    v_rows boolean;
BEGIN
    IF to_regclass('fp_outbox_events_legacy') IS NULL THEN
        RETURN 'absent';
    END IF;
    FOR attempt IN 1..{LOCK_TRIES} LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '{LOCK_TIMEOUT}', true);
            EXECUTE 'LOCK TABLE fp_outbox_events_legacy IN ACCESS EXCLUSIVE MODE';
            PERFORM set_config('lock_timeout', '0', true);
            EXECUTE 'SELECT EXISTS (SELECT 1 FROM fp_outbox_events_legacy)' INTO v_rows;
            IF v_rows THEN
                RETURN 'kept';
            END IF;
            EXECUTE 'CREATE OR REPLACE VIEW fp_outbox_event_states AS ' || $v${_STATES}$v$;
            {_replace_views()}
            EXECUTE 'DROP TABLE fp_outbox_events_legacy';
            RETURN 'dropped';
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.5);  -- a worker moving its rows holds it: try again
        END;
    END LOOP;
    RAISE EXCEPTION 'fp-outbox migrate: fp_outbox_events_legacy stayed locked by other transactions for % tries of %; '
                    'run it again', {LOCK_TRIES}, '{LOCK_TIMEOUT}';
END $fn$"""


def upgrade() -> None:
    op.execute(DROP_LEGACY_IF_EMPTY)
    op.execute("SELECT fp_outbox_drop_legacy_if_empty()")
    op.execute("UPDATE fp_outbox_schema_compat SET revision = '0010'")  # 0007's to 0009's workers work with it


def downgrade() -> None:
    op.execute("UPDATE fp_outbox_schema_compat SET revision = '0009'")
    op.execute("DROP FUNCTION fp_outbox_drop_legacy_if_empty()")
