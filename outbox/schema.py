"""The outbox's tables, defined once as SQLAlchemy metadata; the migrations and the worker's SQL agree with it."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Sequence,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON
from sqlalchemy.dialects.postgresql.base import ischema_names
from sqlalchemy.types import UserDefinedType

#: Alembic keeps the outbox's history in its own version table, so an application that uses
#: Alembic itself can run both histories in one database without them touching each other.
VERSION_TABLE = "fp_outbox_alembic_version"

#: The channel `enqueue` notifies at commit, so an idle worker wakes at once instead of polling.
NOTIFY_CHANNEL = "fp_outbox"

STATUSES = ("pending", "in_flight", "delivered", "dead")

#: Partitions of the event table (migration 0007): a slot comes round again after this many periods.
SLOTS = 16

#: The Alembic revision this release's schema is at, and so what its worker understands.
SCHEMA_REVISION = "0011"


class Xid8(UserDefinedType):
    """PostgreSQL's 64-bit transaction id (pg_current_xact_id()), which never wraps around."""

    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "xid8"


class PgSnapshot(UserDefinedType):
    """PostgreSQL's pg_snapshot: which transactions a snapshot sees as committed."""

    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "pg_snapshot"


# Reflection (Alembic's comparison with this metadata) knows the two types by name.
ischema_names.setdefault("xid8", Xid8)
ischema_names.setdefault("pg_snapshot", PgSnapshot)

metadata = MetaData()


def compared_by_alembic(name: str) -> bool:
    """Whether Alembic's comparison with this metadata covers a table of this name: the outbox's own tables, not
    the partitions of the events (made by the migration, one per slot) nor the previous release's table kept
    while its rows are moved (fp_outbox_events_legacy)."""
    if not name.startswith("fp_outbox_") or name == "fp_outbox_events_legacy":
        return False
    return not (name.startswith("fp_outbox_events_s") and name[len("fp_outbox_events_s"):].isdigit())

# The events, insert-only: enqueue's one row each, never updated; partitioned by slot (the transaction's start
# time over a period, modulo SLOTS: the column's default is fp_outbox_slot(), a PL/pgSQL function with the period
# written in, replaced by fp_outbox_set_slot_period, migration 0009; readers call it too) so that retention truncates
# whole partitions (fp_outbox_events_s00 ... s15). The primary key is the one index: the claim reads it in
# (txid, id) order. json, not jsonb: the text is kept verbatim, so what validation measured is what is sent.
events = Table(
    "fp_outbox_events",
    metadata,
    Column("id", BigInteger, Identity(always=False), nullable=False),
    Column("txid", Xid8, nullable=False, server_default=text("pg_current_xact_id()")),
    Column("slot", SmallInteger, nullable=False, server_default=text("fp_outbox_slot()")),
    Column("insert_id", Text, nullable=False),
    Column("event_name", Text, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("trace_context", Text),
    PrimaryKeyConstraint("txid", "id", "slot", name="fp_outbox_events_pkey"),
    postgresql_partition_by="LIST (slot)",
)

# The delivery log, written by the worker alone: one row per claim (fresh: events by the shared position; due:
# retries), with what became of each event. The latest fresh claim holds the position (win_lo, win_hi, key).
claims = Table(
    "fp_outbox_claims",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("kind", Text, nullable=False),
    Column("owner", Text, nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("lease_until", DateTime(timezone=True), nullable=False),
    Column("ids", ARRAY(BigInteger), nullable=False),
    Column("txids", ARRAY(Xid8), nullable=False, server_default=text("'{}'")),
    Column("slots", ARRAY(SmallInteger), nullable=False, server_default=text("'{}'")),
    Column("done", ARRAY(BigInteger), nullable=False, server_default=text("'{}'")),
    Column("delivered", Integer, nullable=False, server_default=text("0")),
    Column("failed_ids", ARRAY(BigInteger), nullable=False, server_default=text("'{}'")),
    Column("failed_statuses", ARRAY(SmallInteger), nullable=False, server_default=text("'{}'")),
    Column("failed_errors", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("settled_at", DateTime(timezone=True)),
    Column("expired", Boolean, nullable=False, server_default=text("false")),
    Column("win_lo", PgSnapshot),
    Column("win_hi", PgSnapshot),
    Column("key_txid", Xid8),
    Column("key_id", BigInteger),
    Index("fp_outbox_claims_open_idx", "lease_until", postgresql_where=text("settled_at IS NULL")),
    # The claims of a time span (an event's history, the last minute, retention), without reading the log.
    Index("fp_outbox_claims_claimed_at_idx", "claimed_at", postgresql_using="brin",
          postgresql_with={"pages_per_range": 16, "autosummarize": "on"}),
)

# Per event only where it must be: an attempt that failed, a lease that expired, a released or requeued event.
# A copy of the payload, so no partition of the events waits for a retry.
retries = Table(
    "fp_outbox_retries",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("insert_id", Text, nullable=False),
    Column("event_name", Text, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("trace_context", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # While leased: equal to lease_until, so one index range serves due retries and leases that expired.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("lease_owner", Text),
    Column("lease_until", DateTime(timezone=True)),
    Column("last_status", SmallInteger),
    Column("last_error", Text),
    # Delivered at last: kept (next_attempt_at 'infinity', past every due claim) for its history until retention.
    Column("delivered_at", DateTime(timezone=True)),
    Index("fp_outbox_retries_due_idx", "next_attempt_at"),
)

# Dead letters, with their own retention (--retain-dead); never hold a partition of the events back.
dead_letters = Table(
    "fp_outbox_dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("insert_id", Text, nullable=False),
    Column("event_name", Text, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("trace_context", Text),
    Column("attempts", Integer, nullable=False),
    Column("last_status", SmallInteger),
    Column("last_error", Text),
    Column("dead_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Index("fp_outbox_dead_letters_dead_at_idx", "dead_at"),
)

# The period behind fp_outbox_slot(), and since when (retention's arithmetic needs both).
slot_period = Table(
    "fp_outbox_slot_period",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False, server_default=text("1")),
    Column("period_s", Float(precision=53), nullable=False),
    Column("since", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint("id = 1", name="fp_outbox_slot_period_id_check"),
)

# Which revision the schema is at and the oldest worker revision that still works with it.
schema_compat = Table(
    "fp_outbox_schema_compat",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False, server_default=text("1")),
    Column("revision", Text, nullable=False),
    Column("oldest_worker_revision", Text, nullable=False),
    CheckConstraint("id = 1", name="fp_outbox_schema_compat_id_check"),
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

# Until when (epoch milliseconds, the database's clock) some worker idles listening for wake-ups (migration 0009):
# raised by an idle worker (fp_outbox_listening), read by the applications' wake-up (fp_outbox_wake), which
# notifies only while it lies ahead. A sequence for the same reason as the rate limiter's: written in place.
listening_sequence = Sequence("fp_outbox_listening_seq", metadata=metadata, minvalue=0, start=0)
