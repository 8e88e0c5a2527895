"""The queue's figures, database-wide (`fp-outbox status`, the gauges, `status --watch`, the demo): pending, in
flight, dead and the oldest unfinished event's age, and for `status` the deliveries the claims log records; with
the previous release's table counted while it is there (after an upgrade, until its rows are moved)."""

from __future__ import annotations

from sqlalchemy import Connection

from worker.engine import queries

COUNTS = ("pending", "in_flight", "delivered", "dead")


def queue_depth(conn: Connection) -> dict[str, float | int | None]:
    """pending, in_flight, dead and oldest_pending_age_s, from the indexes alone (cheap enough for every scrape)."""
    return _read(conn, queries.QUEUE_DEPTH, queries.LEGACY_QUEUE_DEPTH)


def status_counts(conn: Connection) -> dict[str, float | int | None]:
    """queue_depth's figures and `delivered`: the deliveries recorded in the claims log (kept for
    --retain-delivered), which reads the log, one row per claim, not the events."""
    return _read(conn, queries.STATUS_COUNTS, queries.LEGACY_STATUS_COUNTS)


def _read(conn: Connection, statement, legacy_statement) -> dict[str, float | int | None]:
    figures = dict(conn.execute(statement).mappings().one())
    if conn.execute(queries.LEGACY_PRESENT).scalar_one():
        for key, value in conn.execute(legacy_statement).mappings().one().items():
            if key in COUNTS:
                figures[key] += value
            elif value is not None:
                figures[key] = max(value, figures[key] or 0.0)
    return {key: (int(value) if key in COUNTS else value) for key, value in figures.items()}
