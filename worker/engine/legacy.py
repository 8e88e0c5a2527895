"""The legacy mover: after the upgrade to the insert-only storage (migration 0007), the previous release's table is
fp_outbox_events_legacy, and the workers move what it still holds, a short transaction per batch, beside their
retention: pending rows and expired leases become events again (same id, insert_id, payload and created_at), dead
rows dead letters, and delivered rows are deleted once past --retain-delivered. Once it is empty, `fp-outbox migrate`
drops it (0010's fp_outbox_drop_legacy_if_empty(); it holds delivered rows until their retention ends, a week by
default)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine

from worker.engine import queries
from worker.engine.logs import event, log

WALK_BATCHES = 200  # batches of the delivered rows' walk per run: it resumes where it stopped


@dataclass(frozen=True)
class Moved:
    """One run of the mover: rows that became events again, dead letters, delivered rows deleted."""

    events: int = 0
    dead: int = 0
    delivered: int = 0


class LegacyMover:
    """Moves the previous release's rows while its table exists and holds any; says once when it is empty."""

    def __init__(self, engine: Engine, delivered: timedelta | None, batch_size: int) -> None:
        self._engine, self._delivered, self._batch_size = engine, delivered, batch_size
        self._after = 0  # the delivered rows' walk resumes after this id
        self.done = False

    def run(self) -> Moved:
        """One run: every unfinished and dead row moved, batch after batch; old delivered rows deleted."""
        if self.done or not self._holds_rows():
            return Moved()
        moved = Moved(_drain(self._engine, queries.LEGACY_MOVE_UNFINISHED, self._batch_size),
                      _drain(self._engine, queries.LEGACY_MOVE_DEAD, self._batch_size))
        if self._delivered is not None:
            deleted, self._after = purge_legacy_delivered(self._engine, self._delivered, self._after,
                                                          self._batch_size, WALK_BATCHES)
            moved = Moved(moved.events, moved.dead, deleted)
        if moved.events or moved.dead or moved.delivered:
            event(log, logging.INFO, "moved the previous release's rows into the new storage", events=moved.events,
                  dead_letters=moved.dead, delivered_deleted=moved.delivered)
        return moved

    def next_lease_end(self) -> float | None:
        """Seconds until a row the previous release's worker holds is the mover's (its lease runs out), if any."""
        if self.done:
            return None
        with self._engine.connect() as conn:
            if not conn.execute(queries.LEGACY_PRESENT).scalar_one():
                return None
            return conn.execute(queries.LEGACY_NEXT_LEASE_END).scalar_one()

    def _holds_rows(self) -> bool:
        with self._engine.connect() as conn:
            present = conn.execute(queries.LEGACY_PRESENT).scalar_one()
            if present and conn.execute(queries.LEGACY_ANY).scalar_one():
                return True
        self.done = True
        if present:
            event(log, logging.INFO, "legacy table empty: fp_outbox_events_legacy holds no rows of the previous "
                  "release any more (`fp-outbox migrate` drops it, from 0.5.0 on)")
        return False


def _drain(engine: Engine, statement, batch_size: int) -> int:
    total, moved = 0, batch_size
    while moved >= batch_size:
        with engine.begin() as conn:  # one batch, one transaction: moved whole or not at all
            moved = conn.execute(statement, {"batch_size": batch_size}).scalar_one()
        total += moved
    return total


def purge_legacy_delivered(engine: Engine, older_than: timedelta, after: int, batch_size: int,
                           max_batches: int = sys.maxsize) -> tuple[int, int]:
    """Delete the previous release's delivered rows delivered more than `older_than` ago, walking its primary key
    from `after`; returns (how many, where the next walk resumes: at the first row still too recent, or from the
    start once the walk reached the end)."""
    total = 0
    for _ in range(max_batches):
        with engine.begin() as conn:
            batch = conn.execute(queries.LEGACY_PURGE_DELIVERED_BATCH, {
                "after": after, "batch_size": batch_size, "older_than_s": older_than.total_seconds()}).one()
        total += batch.deleted
        if batch.first_young is not None:
            return total, batch.first_young - 1
        if batch.last_id is None:
            return total, 0
        after = batch.last_id
    return total, after
