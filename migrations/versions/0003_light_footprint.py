"""A lighter footprint in the application's database: the payload stored verbatim as json, the rate limiter
on a sequence instead of a row, and autovacuum settings for a table that churns.

Changing the payload's type rewrites the table under an exclusive lock (enqueue waits for it): upgrade at a
quiet moment, after retention has kept the table small.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: The advisory lock that makes a read and a write of the rate-limit schedule one step: b"fpoutbox" as a bigint.
RATE_LIMIT_LOCK = 0x66706F7574626F78

# GCRA's one number, the instant (microseconds since the epoch) the next slice of the shared budget starts,
# lives in a sequence: a sequence is updated in place, outside MVCC, so taking permits leaves no row versions
# behind. A single limiter row updated on every claim grew a chain of versions that no vacuum could remove
# while any snapshot was open, and every claim had to walk it.
TAKE_PERMITS = f"""
CREATE FUNCTION fp_outbox_take_permits(span_s float8) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    now_us bigint;
    start_us bigint;
BEGIN
    -- Held to the end of the caller's transaction: no other taker reads the schedule in between.
    PERFORM pg_advisory_xact_lock({RATE_LIMIT_LOCK});
    now_us := (extract(epoch FROM clock_timestamp()) * 1e6)::bigint;
    SELECT greatest(last_value, now_us) INTO start_us FROM fp_outbox_rate_limit_seq;
    PERFORM setval('fp_outbox_rate_limit_seq', start_us + (span_s * 1e6)::bigint);
    RETURN to_timestamp(start_us / 1e6);  -- the caller's slice starts here and lasts span_s
END
$$"""

# A 429 pauses every worker: no slice may start before the pause ends (returned).
PAUSE_PERMITS = f"""
CREATE FUNCTION fp_outbox_pause_permits(pause_s float8) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    until_us bigint;
BEGIN
    PERFORM pg_advisory_xact_lock({RATE_LIMIT_LOCK});
    SELECT greatest(last_value, (extract(epoch FROM clock_timestamp()) * 1e6)::bigint + (pause_s * 1e6)::bigint)
      INTO until_us FROM fp_outbox_rate_limit_seq;
    PERFORM setval('fp_outbox_rate_limit_seq', until_us);
    RETURN to_timestamp(until_us / 1e6);
END
$$"""

# Each value with its reason. Every delivery writes three row versions (insert, claim, settle) and none of
# the updates can be HOT (status sits in both partial indexes' predicates, next_attempt_at is indexed), so
# fillfactor would not buy HOT updates and is left at 100.
AUTOVACUUM = {
    # The default waits until a fifth of the table is dead. The table holds the retention window (days of
    # deliveries) and churns at the delivery rate: at 2 % bloat stays small, while each vacuum (whose index
    # passes read whole indexes, so cost grows with the table) still has 2 % of the table's rows to collect.
    "autovacuum_vacuum_scale_factor": "0.02",
    # A small or freshly purged table still gets vacuumed once a few thousand versions are dead, before its
    # claim has many dead index entries to step over.
    "autovacuum_vacuum_threshold": "5000",
    # Inserts alone (a backlog building up) also trigger a vacuum, at the same 2 %, so the visibility map and
    # freezing keep up with an append-heavy table before it becomes an anti-wraparound emergency.
    "autovacuum_vacuum_insert_scale_factor": "0.02",
    # The planner's idea of how many rows are pending changes fast; analyze at 2 % too.
    "autovacuum_analyze_scale_factor": "0.02",
    # Half the default throttle (2 ms): a vacuum pass over a table this busy finishes before the next is due.
    "autovacuum_vacuum_cost_delay": "1",
}


def upgrade() -> None:
    # json keeps the text verbatim: what validation measured is what is stored is what is sent.
    op.execute("ALTER TABLE fp_outbox_events ALTER COLUMN payload TYPE json USING payload::json")
    op.execute("DROP TABLE fp_outbox_rate_limiter")
    op.execute("CREATE SEQUENCE fp_outbox_rate_limit_seq AS bigint MINVALUE 0 START WITH 0")
    op.execute(TAKE_PERMITS)
    op.execute(PAUSE_PERMITS)
    options = ", ".join(f"{name} = {value}" for name, value in AUTOVACUUM.items())
    op.execute(f"ALTER TABLE fp_outbox_events SET ({options})")


def downgrade() -> None:
    op.execute(f"ALTER TABLE fp_outbox_events RESET ({', '.join(AUTOVACUUM)})")
    op.execute("DROP FUNCTION fp_outbox_pause_permits(float8)")
    op.execute("DROP FUNCTION fp_outbox_take_permits(float8)")
    op.execute("DROP SEQUENCE fp_outbox_rate_limit_seq")
    op.execute("CREATE TABLE fp_outbox_rate_limiter (id smallint PRIMARY KEY, next_free_at timestamptz NOT NULL)")
    op.execute("ALTER TABLE fp_outbox_events ALTER COLUMN payload TYPE jsonb USING payload::jsonb")
