"""The outbox table, defined once as SQLAlchemy metadata; the migrations and the worker's SQL agree with it."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Sequence,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSON

#: Alembic keeps the outbox's history in its own version table, so an application that uses
#: Alembic itself can run both histories in one database without them touching each other.
VERSION_TABLE = "fp_outbox_alembic_version"

#: The channel `enqueue` notifies at commit, so an idle worker wakes at once instead of polling.
NOTIFY_CHANNEL = "fp_outbox"

STATUSES = ("pending", "in_flight", "delivered", "dead")

metadata = MetaData()

events = Table(
    "fp_outbox_events",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("insert_id", Text, nullable=False),
    Column("event_name", Text, nullable=False),
    # json, not jsonb: the text is kept verbatim, so what validation measured is what is stored and sent.
    Column("payload", JSON, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # While pending: when the row may be sent. While in flight: equal to lease_until, so one
    # index range serves both new rows and rows whose worker died.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("lease_owner", Text),
    Column("lease_until", DateTime(timezone=True)),
    Column("last_status", SmallInteger),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("delivered_at", DateTime(timezone=True)),
    Column("dead_at", DateTime(timezone=True)),
    # The W3C trace context (traceparent, tracestate, as JSON) of the span that enqueued the event, when the
    # application traces with OpenTelemetry; the worker links its delivery spans to it. Never sent.
    Column("trace_context", Text),
    CheckConstraint(
        "status IN ('pending', 'in_flight', 'delivered', 'dead')", name="fp_outbox_events_status_check"
    ),
    # The claim query's index: only deliverable rows, so delivered and dead rows kept for
    # auditing never make claiming slower.
    Index(
        "fp_outbox_events_due_idx",
        "next_attempt_at",
        postgresql_where=text("status IN ('pending', 'in_flight')"),
    ),
    # Dead rows are few and often looked at (admin commands, requeue, purge, metrics): found
    # without scanning the delivered rows kept for retention.
    Index("fp_outbox_events_dead_idx", "dead_at", postgresql_where=text("status = 'dead'")),
)

# The endpoint's state, shared by every worker (worker.engine.endpoint): one row, written at each change and
# per probe during an outage, read by every claim.
endpoint = Table(
    "fp_outbox_endpoint",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False, server_default=text("1")),
    Column("down_since", DateTime(timezone=True)),
    Column("probes", Integer, nullable=False, server_default=text("0")),
    Column("next_probe_at", DateTime(timezone=True)),
    Column("probe_owner", Text),
    Column("probe_until", DateTime(timezone=True)),
    Column("reason", Text),
    Column("changed_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint("id = 1", name="fp_outbox_endpoint_id_check"),
)

# The global rate limiter's one number (GCRA's "theoretical arrival time", in microseconds since the epoch),
# shared by every worker so that together they stay under the requests-per-second cap. A sequence, not a
# row: it is updated in place, so it leaves no row versions behind under a long-running snapshot. Read and
# written only by the SQL functions fp_outbox_take_permits and fp_outbox_pause_permits (migration 0003), and
# fp_outbox_reset_permits, which puts it back to the database's clock after a clock step (migration 0004).
rate_limit_sequence = Sequence("fp_outbox_rate_limit_seq", metadata=metadata, minvalue=0, start=0)
