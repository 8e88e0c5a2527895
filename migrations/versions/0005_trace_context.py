"""The trace context an event was enqueued in (W3C traceparent and tracestate, as JSON), so the worker's
delivery spans can link to the request that enqueued it (the `otel` extra). Never sent to Freshpaint.

Expand-only, and never blocks the application for more than a moment: adding a nullable column without a
default rewrites nothing, but it needs the table's ACCESS EXCLUSIVE lock for an instant, and a lock request
waiting behind a long transaction would queue every enqueue behind it. So the request gives up after
LOCK_TIMEOUT and is tried again, up to ATTEMPTS times.

The roles that may insert the payload (the application's) may insert the trace context too, so an
application that starts tracing after the upgrade keeps enqueueing under least-privilege grants.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-12
"""
import time

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LOCK_TIMEOUT = "200ms"  # the longest an enqueue may queue behind this migration's lock request
ATTEMPTS = 50
RETRY_PAUSE_S = 0.2  # between attempts, so that transactions queued behind a failed attempt go through

GRANT_TO_INSERTERS = """
DO $$
DECLARE inserter text;
BEGIN
    FOR inserter IN
        SELECT DISTINCT grantee FROM information_schema.column_privileges
         WHERE table_schema = current_schema() AND table_name = 'fp_outbox_events' AND column_name = 'payload'
           AND privilege_type = 'INSERT'
           AND grantee <> (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'fp_outbox_events'::regclass)
    LOOP
        EXECUTE format('GRANT INSERT (trace_context) ON fp_outbox_events TO %s',
                       CASE WHEN inserter = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(inserter) END);
    END LOOP;
END
$$"""


def upgrade() -> None:
    _with_short_lock("ALTER TABLE fp_outbox_events ADD COLUMN IF NOT EXISTS trace_context text")
    op.execute(GRANT_TO_INSERTERS)


def downgrade() -> None:
    _with_short_lock("ALTER TABLE fp_outbox_events DROP COLUMN IF EXISTS trace_context")


def _with_short_lock(statement: str) -> None:
    """Run `statement` under a short lock_timeout, in a savepoint, trying again while the lock is busy; the
    transaction's own lock_timeout is restored afterwards for whatever migration follows."""
    bind = op.get_bind()
    before = bind.exec_driver_sql("SELECT current_setting('lock_timeout')").scalar()
    for attempt in range(1, ATTEMPTS + 1):
        savepoint = bind.begin_nested()
        try:
            bind.execute(sa.text("SELECT set_config('lock_timeout', :timeout, true)"), {"timeout": LOCK_TIMEOUT})
            bind.exec_driver_sql(statement)
        except sa.exc.OperationalError as exc:
            savepoint.rollback()
            if getattr(exc.orig, "sqlstate", None) != "55P03" or attempt == ATTEMPTS:  # 55P03: lock_not_available
                raise
            time.sleep(RETRY_PAUSE_S)
            continue
        savepoint.commit()
        break
    bind.execute(sa.text("SELECT set_config('lock_timeout', :timeout, true)"), {"timeout": before})
