"""The shared rate schedule survives a clock step on the database host: a function that puts the schedule back
to the database's clock when it is further ahead than it can legitimately run.

The schedule (fp_outbox_rate_limit_seq) is absolute time on the database's clock. A step back of that clock,
or a failover to a host whose clock is behind, leaves it in the future, and every grant would wait until the
clock caught up (an hour, for a step of an hour). Workers of this release call fp_outbox_reset_permits when
a grant starts further ahead than a 429 pause at its longest plus the longest any grant is waited for.

Expand-only: one new function; fp_outbox_take_permits(float8) and fp_outbox_pause_permits(float8), which the
previous release's workers call, are unchanged, and nothing locks fp_outbox_events.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: The advisory lock of the schedule (migration 0003): b"fpoutbox" as a bigint.
RATE_LIMIT_LOCK = 0x66706F7574626F78

# Under the schedule's lock, like every other reader and writer of it: a schedule ahead of the clock by more
# than max_ahead_s starts again now. Returns how far ahead it was, in seconds, when it reset it (else NULL),
# for the worker's log line.
RESET_PERMITS = f"""
CREATE OR REPLACE FUNCTION fp_outbox_reset_permits(max_ahead_s float8) RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
    now_us bigint;
    ahead_us bigint;
BEGIN
    PERFORM pg_advisory_xact_lock({RATE_LIMIT_LOCK});
    now_us := (extract(epoch FROM clock_timestamp()) * 1e6)::bigint;
    SELECT last_value - now_us INTO ahead_us FROM fp_outbox_rate_limit_seq;
    IF ahead_us <= (max_ahead_s * 1e6)::bigint THEN
        RETURN NULL;  -- within what grants and a 429 pause can put there: left as it is
    END IF;
    PERFORM setval('fp_outbox_rate_limit_seq', now_us);
    RETURN ahead_us / 1e6;
END
$$"""


def upgrade() -> None:
    op.execute(RESET_PERMITS)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS fp_outbox_reset_permits(float8)")  # 0003's functions were never touched
