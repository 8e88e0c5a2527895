"""Views for the questions operators ask (stuck, overdue, dead, lag), and an index on dead rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The views read the table directly and hold no data; each answers one question at 3 a.m.
VIEWS = {
    # In flight past the lease: its worker died or hung. Any worker claims it again by itself;
    # rows that stay here mean no worker is running (or `fp-outbox requeue --stuck`).
    "fp_outbox_stuck": """
        SELECT id, insert_id, event_name, attempts, lease_owner, lease_until,
               extract(epoch FROM now() - lease_until)::float8 AS lease_expired_s,
               last_status, last_error, created_at
          FROM fp_outbox_events
         WHERE status = 'in_flight' AND lease_until < now()
    """,
    # Pending and due more than a minute ago: workers are missing, stopped or far behind.
    "fp_outbox_overdue": """
        SELECT id, insert_id, event_name, attempts, next_attempt_at,
               extract(epoch FROM now() - next_attempt_at)::float8 AS overdue_s,
               last_status, last_error, created_at
          FROM fp_outbox_events
         WHERE status = 'pending' AND next_attempt_at < now() - interval '1 minute'
    """,
    # Dead letters with why: last_status is the HTTP answer (null when none came), last_error the reason.
    "fp_outbox_dead": """
        SELECT id, insert_id, event_name, attempts, last_status, last_error, dead_at, created_at
          FROM fp_outbox_events
         WHERE status = 'dead'
    """,
    # One row per status, zero included: how many, and how old the oldest is (the lag, for pending).
    "fp_outbox_lag": """
        SELECT s.status, count(e.id) AS count,
               extract(epoch FROM now() - min(e.created_at))::float8 AS oldest_age_s
          FROM (VALUES (1, 'pending'), (2, 'in_flight'), (3, 'delivered'), (4, 'dead')) AS s(ord, status)
          LEFT JOIN fp_outbox_events AS e ON e.status = s.status
         GROUP BY s.ord, s.status
         ORDER BY s.ord
    """,
}


def upgrade() -> None:
    # Dead rows are few and looked at often (`fp-outbox dead`, requeue, purge, the metrics'
    # dead count): a partial index keeps those cheap without a scan of every delivered row.
    op.create_index(
        "fp_outbox_events_dead_idx",
        "fp_outbox_events",
        ["dead_at"],
        postgresql_where=sa.text("status = 'dead'"),
    )
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("fp_outbox_events_dead_idx", table_name="fp_outbox_events")
