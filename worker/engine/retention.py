"""Retention: deleting old delivered and dead rows in short batches, for the operator's `fp-outbox purge` and
for the worker, which does it on a thread of its own, off the delivery path."""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from worker.engine import queries
from worker.engine.logs import event, first_line, log

RETENTION_EVERY = 60.0  # at most this many seconds between runs of the worker's retention (own thread)
BATCH_SIZE = 5000  # rows a batch looks at; each batch is its own short transaction
IDLE_BATCHES = 20  # a run ends after this many batches that delete less than half their size ...
FULL_WALK_EVERY = 3600.0  # ... and now and then a walk starts again from the first row (seconds)


def purge_delivered(engine: Engine, older_than: timedelta, batch_size: int = BATCH_SIZE, max_batches: int = 20) -> int:
    """Delete delivered rows delivered more than `older_than` ago; returns how many (`fp-outbox purge`).

    At most `max_batches` short transactions, each looking at the next `batch_size` rows in enqueue
    (id) order from the first row, until a batch holds only rows enqueued after the cutoff; so a call's cost
    is bounded and follows the old rows, not the table. Call it again later for the rest.
    """
    _check(batch_size, max_batches)
    total, after = 0, 0
    for _ in range(max_batches):
        batch = _delivered_batch(engine, after, older_than, batch_size)
        total += batch.deleted
        if batch.done or batch.last_id is None:
            break
        after = batch.last_id
    return total


def purge_dead(engine: Engine, older_than: timedelta, batch_size: int = BATCH_SIZE, max_batches: int = 20) -> int:
    """Delete dead rows that died more than `older_than` ago, in at most `max_batches` transactions."""
    _check(batch_size, max_batches)
    total = 0
    params = {"older_than_s": older_than.total_seconds(), "batch_size": batch_size}
    for _ in range(max_batches):
        with engine.begin() as conn:  # one short transaction per batch: row locks on this batch only
            batch = conn.execute(queries.PURGE_DEAD_BATCH, params).one()
        total += batch.deleted
        if batch.done:
            break
    return total


class Retention:
    """The worker's retention: delivered rows past `delivered` and dead rows past `dead` (None: keep them).

    Delivered rows are found by a walk over the primary key that resumes, run after run, where the last run
    stopped, and starts each new walk at the lowest row it had to keep (pending, in flight, delivered too
    recently), with a walk from the first row now and then. So rows it must keep, however many, cost a run
    its time but never stop it: the next run goes on from there. A run goes on while its batches delete at
    least half of what they look at (keeping pace with heavy delivery) and ends after `idle_batches` that do
    not. Dead rows come from their own partial index, oldest first.
    """

    def __init__(self, engine: Engine, delivered: timedelta | None, dead: timedelta | None,
                 batch_size: int = BATCH_SIZE, idle_batches: int = IDLE_BATCHES, clock=time.monotonic) -> None:
        _check(batch_size, idle_batches)
        self._engine, self._delivered, self._dead = engine, delivered, dead
        self._batch_size, self._idle_batches, self._clock = batch_size, idle_batches, clock
        self._cursor = 0  # the walk resumes after this id
        self._restart_at: int | None = None  # the lowest id this walk had to keep
        self._full_walk_at = clock() + FULL_WALK_EVERY

    def run(self) -> tuple[int, int]:
        """One run: returns how many delivered and how many dead rows it deleted."""
        delivered = self._walk(self._delivered) if self._delivered else 0
        dead = purge_dead(self._engine, self._dead, self._batch_size, sys.maxsize) if self._dead else 0
        return delivered, dead

    def _walk(self, older_than: timedelta) -> int:
        total = idle = 0
        while idle < self._idle_batches:
            batch = _delivered_batch(self._engine, self._cursor, older_than, self._batch_size)
            total += batch.deleted
            if batch.lowest_kept is not None:
                self._restart_at = min(self._restart_at or batch.lowest_kept, batch.lowest_kept)
            if batch.done or batch.last_id is None:
                self._next_walk()
                break
            self._cursor = batch.last_id
            idle += batch.deleted * 2 < self._batch_size
        return total

    def _next_walk(self) -> None:
        """The walk reached rows too young to be old enough: the next one starts at the lowest row kept."""
        if self._clock() >= self._full_walk_at:
            self._cursor, self._full_walk_at = 0, self._clock() + FULL_WALK_EVERY
        elif self._restart_at is not None:
            self._cursor = self._restart_at - 1
        self._restart_at = None


def _delivered_batch(engine: Engine, after: int, older_than: timedelta, batch_size: int):
    with engine.begin() as conn:  # one short transaction per batch: row locks on this batch only
        return conn.execute(queries.PURGE_DELIVERED_BATCH, {
            "after": after, "older_than_s": older_than.total_seconds(), "batch_size": batch_size}).one()


def _check(batch_size: int, batches: int) -> None:
    if batch_size < 1 or batches < 1:
        raise ValueError(f"batch_size and the number of batches must be at least 1, got {batch_size} and {batches}")


def start_retention(engine: Engine, delivered: timedelta | None, dead: timedelta | None,
                    stopping: threading.Event) -> threading.Thread:
    """Run retention about once a minute on a daemon thread, until `stopping`."""
    retention = Retention(engine, delivered, dead)
    # Half the shortest retention age for short ones (tests, demos), so rows never outstay it by much.
    every = min([RETENTION_EVERY] + [max(1.0, age.total_seconds() / 2) for age in (delivered, dead) if age])
    thread = threading.Thread(target=_retain, args=(retention, every, stopping), name="fp-outbox-retention",
                              daemon=True)
    thread.start()
    return thread


def _retain(retention: Retention, every: float, stopping: threading.Event) -> None:
    while not stopping.wait(every):
        try:
            delivered, dead = retention.run()
        except SQLAlchemyError as exc:
            event(log, logging.WARNING, "retention purge failed; trying again later", error=first_line(exc))
            continue
        if delivered or dead:
            event(log, logging.INFO, "purged old rows", delivered=delivered, dead=dead)
