"""The outbox table and the shared rate limiter row.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = ("fp_outbox",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fp_outbox_events",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("insert_id", sa.Text, nullable=False),
        sa.Column("event_name", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("last_status", sa.SmallInteger),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("dead_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "status IN ('pending', 'in_flight', 'delivered', 'dead')", name="fp_outbox_events_status_check"
        ),
    )
    op.create_index(
        "fp_outbox_events_due_idx",
        "fp_outbox_events",
        ["next_attempt_at"],
        postgresql_where=sa.text("status IN ('pending', 'in_flight')"),
    )
    op.create_table(
        "fp_outbox_rate_limiter",
        sa.Column("id", sa.SmallInteger, primary_key=True),
        sa.Column("next_free_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fp_outbox_rate_limiter")
    op.drop_index("fp_outbox_events_due_idx", table_name="fp_outbox_events")
    op.drop_table("fp_outbox_events")
