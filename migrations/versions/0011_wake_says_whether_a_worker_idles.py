"""The applications' wake-up says whether it found a worker idling, so that while every worker is busy a process
checks a few times a second instead of forty.

0009's fp_outbox_wake() notifies only while a worker has said it idles, and otherwise reads one row; but it returns
nothing, so an application cannot tell the two apart, and keeps sending it at the most its waker allows (one per
25 ms per process: 320 a second for 8 processes) through a whole busy spell, an outage's backlog say, when no worker
waits for it. On these 2 cores those 320 calls a second took 14-17 % of one core (pgbench at that rate, the
machine's CPU from /proc/stat). fp_outbox_wake_if_idle() does the same and returns whether it notified; the waker
(outbox.wake) then spaces the next check by BUSY_WAKE_INTERVAL instead, and a commit meanwhile is still woken for
at the end of that interval.

Expand-only: 0009's fp_outbox_wake() stays for the previous releases' applications, and the workers of 0007 on are
untouched. PL/pgSQL (its body compiled once per session) and SECURITY DEFINER like fp_outbox_wake(): no role needs a
grant on the sequence it reads.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

WAKE_IF_IDLE = """
CREATE FUNCTION fp_outbox_wake_if_idle() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $fn$
BEGIN
    IF (SELECT s.last_value FROM fp_outbox_listening_seq AS s) > extract(epoch FROM clock_timestamp()) * 1000 THEN
        PERFORM pg_notify('fp_outbox', '');
        RETURN true;
    END IF;
    RETURN false;
END $fn$"""


def upgrade() -> None:
    op.execute(WAKE_IF_IDLE)
    op.execute("UPDATE fp_outbox_schema_compat SET revision = '0011'")  # 0007's to 0010's workers work with it


def downgrade() -> None:
    op.execute("UPDATE fp_outbox_schema_compat SET revision = '0010'")
    op.execute("DROP FUNCTION fp_outbox_wake_if_idle()")
