"""Retention: deleting old delivered (and, for the operator, dead) rows in short batches, and the thread on
which the worker does it off the delivery path."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from worker.engine import queries
from worker.engine.logs import event, first_line, log

RETENTION_EVERY = 60.0  # at most this many seconds between purges of old delivered rows (own thread)


def purge_delivered(engine: Engine, older_than: timedelta, batch_size: int = 5000, max_batches: int = 20) -> int:
    """Delete delivered rows delivered more than `older_than` ago; returns how many.

    At most `max_batches` short transactions, each looking at the next `batch_size` rows in enqueue
    (id) order, until a batch holds only rows enqueued after the cutoff; so a call's cost is bounded
    and follows the old rows, not the table. Call it again later for the rest.
    """
    return _purge(engine, queries.PURGE_DELIVERED_BATCH, older_than, batch_size, max_batches)


def purge_dead(engine: Engine, older_than: timedelta, batch_size: int = 5000, max_batches: int = 20) -> int:
    """Delete dead rows that died more than `older_than` ago, in at most `max_batches` transactions."""
    return _purge(engine, queries.PURGE_DEAD_BATCH, older_than, batch_size, max_batches)


def _purge(engine: Engine, statement, older_than: timedelta, batch_size: int, max_batches: int) -> int:
    if batch_size < 1 or max_batches < 1:
        raise ValueError(f"batch_size and max_batches must be at least 1, got {batch_size} and {max_batches}")
    total, after = 0, 0
    params = {"older_than_s": older_than.total_seconds(), "batch_size": batch_size}
    for _ in range(max_batches):
        with engine.begin() as conn:  # one short transaction per batch: row locks on this batch only
            row = conn.execute(statement, {**params, "after": after}).one()
        total += row.deleted
        if row.done:
            break
        after = row.last_id
    return total


def start_retention(engine: Engine, older_than: timedelta, stopping: threading.Event) -> threading.Thread:
    """Purge delivered rows older than `older_than` about once a minute on a daemon thread, until `stopping`."""
    thread = threading.Thread(target=_retain, args=(engine, older_than, stopping), name="fp-outbox-retention",
                              daemon=True)
    thread.start()
    return thread


def _retain(engine: Engine, older_than: timedelta, stopping: threading.Event) -> None:
    # Half the retention age for short ones (tests, demos), so rows never outstay it by much.
    every = min(RETENTION_EVERY, max(1.0, older_than.total_seconds() / 2))
    while not stopping.wait(every):
        try:
            purged = purge_delivered(engine, older_than)
        except SQLAlchemyError as exc:
            event(log, logging.WARNING, "retention purge failed; trying again later", error=first_line(exc))
            continue
        if purged:
            event(log, logging.INFO, "purged delivered rows", count=purged, older_than_s=older_than.total_seconds())
