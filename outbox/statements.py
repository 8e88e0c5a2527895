"""The SQL `enqueue` runs, written once with SQLAlchemy's :name placeholders; psycopg's form is derived."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import TextClause, text
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg


@dataclass(frozen=True)
class Statement:
    """One statement in both spellings: `sqlalchemy` for text(), `psycopg` with %(name)s placeholders."""

    sqlalchemy: TextClause
    psycopg: str


def _statement(sql: str) -> Statement:
    clause = text(sql)
    # SQLAlchemy's own compiler writes the psycopg spelling (placeholders, % escaping), so the
    # two can never disagree.
    return Statement(clause, str(clause.compile(dialect=PGDialect_psycopg())))


# A plain INSERT: nothing inside the caller's transaction that makes other commits wait (a NOTIFY
# here would serialise every enqueuing commit on the server; outbox.wake sends it after commit).
# The payload is the exact text validation measured; json keeps it verbatim (and a jsonb column
# takes it through PostgreSQL's assignment cast).
INSERT_ONE = _statement(
    "INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
    " VALUES (:insert_id, :event_name, CAST(:payload AS json))"
)

# Many rows in one statement: three parallel arrays unnested server-side, in the caller's order.
INSERT_MANY = _statement(
    "INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
    " SELECT u.insert_id, u.event_name, CAST(u.payload AS json)"
    " FROM unnest(CAST(:insert_ids AS text[]), CAST(:event_names AS text[]), CAST(:payloads AS text[]))"
    " AS u(insert_id, event_name, payload)"
)

# The same, with the trace context the application's active span gives (outbox.tracecontext), in its own
# column: used only when there is one, so an application that does not trace writes exactly the statements
# above. One context for all the rows of enqueue_many: they were enqueued in the same span.
INSERT_ONE_TRACED = _statement(
    "INSERT INTO fp_outbox_events (insert_id, event_name, payload, trace_context)"
    " VALUES (:insert_id, :event_name, CAST(:payload AS json), :trace_context)"
)

INSERT_MANY_TRACED = _statement(
    "INSERT INTO fp_outbox_events (insert_id, event_name, payload, trace_context)"
    " SELECT u.insert_id, u.event_name, CAST(u.payload AS json), CAST(:trace_context AS text)"
    " FROM unnest(CAST(:insert_ids AS text[]), CAST(:event_names AS text[]), CAST(:payloads AS text[]))"
    " AS u(insert_id, event_name, payload)"
)
