"""Retention on the insert-only storage, for the worker (a thread of its own, off the delivery path) and for the
operator's `fp-outbox purge`: delivered events go by whole partitions (fp_outbox_truncate_slot: a slot once every
event in it is claimed and settled and its newest is past --retain-delivered), the claims log and the delivered
retries past the same age in short batches, dead letters past --retain-dead. Nothing deletes from the events."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from outbox.schema import SLOTS
from worker.engine import queries
from worker.engine.legacy import LegacyMover, purge_legacy_delivered
from worker.engine.logs import event, first_line, log

RETENTION_EVERY = 60.0  # at most this many seconds between runs of the worker's retention (own thread)
BATCH_SIZE = 5000  # rows a batch looks at; each batch is its own short transaction
#: Why a slot old enough to go was kept (fp_outbox_truncate_slot's answers), as the log line says it.
KEPT = {"unclaimed": "events in it not claimed yet (workers stopped, or far behind)",
        "unsettled": "a claim still in flight (or past its lease) lists it",
        "busy": "a transaction still writing it held its lock"}


@dataclass(frozen=True)
class Purged:
    """What a purge or a retention run removed: the slots truncated (slot -> its events, as the statistics count
    them), the slots old enough but kept (slot -> unclaimed, unsettled or busy), claims log rows, delivered retries
    rows, the previous release's delivered rows, and dead letters."""

    truncated: Mapping[int, int] = field(default_factory=dict)
    kept: Mapping[int, str] = field(default_factory=dict)
    claims: int = 0
    retries: int = 0
    legacy: int = 0
    dead: int = 0

    @property
    def anything(self) -> bool:
        return bool(self.truncated or self.claims or self.retries or self.legacy or self.dead)


def truncate_slots(engine: Engine, older_than: timedelta) -> tuple[dict[int, int], dict[int, str]]:
    """Truncate every slot that may go; returns (slot -> its events, slot -> why kept) for the old enough ones."""
    with engine.connect() as conn:
        sizes = {row.slot: int(row.events) for row in conn.execute(queries.SLOT_SIZES)}
    truncated, kept = {}, {}
    for slot in range(SLOTS):
        with engine.begin() as conn:  # one slot a transaction: its lock is held for that slot's TRUNCATE only
            outcome = conn.execute(queries.TRUNCATE_SLOT, {"slot": slot, "retain_s": older_than.total_seconds()}
                                   ).scalar_one()
        if outcome == "truncated":
            truncated[slot] = sizes.get(slot, 0)
        elif outcome in KEPT:
            kept[slot] = outcome
    return truncated, kept


def preview_truncate(engine: Engine, older_than: timedelta) -> tuple[dict[int, int], dict[int, str]]:
    """What truncate_slots would do now, changing nothing (`purge --dry-run`): each slot's truncate is run and rolled
    back at once, so the answer is the function's own, and its lock is held only for that moment."""
    with engine.connect() as conn, conn.begin() as outer:
        sizes = {row.slot: int(row.events) for row in conn.execute(queries.SLOT_SIZES)}
        truncated, kept = {}, {}
        for slot in range(SLOTS):
            attempt = conn.begin_nested()
            outcome = conn.execute(queries.TRUNCATE_SLOT, {"slot": slot, "retain_s": older_than.total_seconds()}
                                   ).scalar_one()
            attempt.rollback()
            if outcome == "truncated":
                truncated[slot] = sizes.get(slot, 0)
            elif outcome in KEPT:
                kept[slot] = outcome
        outer.rollback()
    return truncated, kept


def purge_claims(engine: Engine, older_than: timedelta, batch_size: int = BATCH_SIZE,
                 max_batches: int = sys.maxsize) -> int:
    """Delete settled claims log rows settled more than `older_than` ago, in id order, never the latest fresh claim;
    at most `max_batches` transactions of `batch_size` ids each. Returns how many."""
    _check(batch_size, max_batches)
    with engine.connect() as conn:
        from_id = conn.execute(queries.FIRST_CLAIM).scalar_one()
    total = 0
    for _ in range(max_batches if from_id is not None else 0):
        with engine.begin() as conn:
            batch = conn.execute(queries.PURGE_CLAIMS_BATCH, {
                "from_id": from_id, "batch_size": batch_size, "older_than_s": older_than.total_seconds()}).one()
        total += batch.deleted
        if batch.done:
            break
        from_id += batch_size
    return total


def purge_delivered(engine: Engine, older_than: timedelta, batch_size: int = BATCH_SIZE,
                    max_batches: int = sys.maxsize) -> Purged:
    """Retire what was delivered more than `older_than` ago (`fp-outbox purge --delivered-older-than`): the slots that
    may go, truncated; the claims log, the delivered retries and the previous release's delivered rows in batches."""
    truncated, kept = truncate_slots(engine, older_than)
    retries = _drain(engine, queries.PURGE_DELIVERED_RETRIES_BATCH, older_than, batch_size, max_batches)
    legacy = 0
    if _legacy_present(engine):
        legacy, _ = purge_legacy_delivered(engine, older_than, 0, batch_size, max_batches)
    return Purged(truncated, kept, purge_claims(engine, older_than, batch_size, max_batches), retries, legacy)


def purge_dead(engine: Engine, older_than: timedelta, batch_size: int = BATCH_SIZE, max_batches: int = 20) -> int:
    """Delete dead letters that died more than `older_than` ago, oldest first, in at most `max_batches`
    transactions of `batch_size`; returns how many."""
    return _drain(engine, queries.PURGE_DEAD_BATCH, older_than, batch_size, max_batches)


def _drain(engine: Engine, statement, older_than: timedelta, batch_size: int, max_batches: int) -> int:
    _check(batch_size, max_batches)
    total = 0
    for _ in range(max_batches):
        with engine.begin() as conn:  # one short transaction per batch: row locks on this batch only
            batch = conn.execute(statement, {"older_than_s": older_than.total_seconds(),
                                             "batch_size": batch_size}).one()
        total += batch.deleted
        if batch.done:
            break
    return total


def _legacy_present(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(queries.LEGACY_PRESENT).scalar_one())


def _check(batch_size: int, batches: int) -> None:
    if batch_size < 1 or batches < 1:
        raise ValueError(f"batch_size and the number of batches must be at least 1, got {batch_size} and {batches}")


class Retention:
    """The worker's retention: what was delivered more than `delivered` ago and dead letters older than `dead`
    (None: keep them), and the previous release's table moved into the new storage while it holds rows."""

    def __init__(self, engine: Engine, delivered: timedelta | None, dead: timedelta | None,
                 batch_size: int = BATCH_SIZE) -> None:
        _check(batch_size, 1)
        self._engine, self._delivered, self._dead, self._batch_size = engine, delivered, dead, batch_size
        self._mover = LegacyMover(engine, delivered, batch_size)
        self._period: float | None = None  # the slot period in force, as the last try to set it answered

    @property
    def finished(self) -> bool:
        """Nothing is left for it to do, ever: retention off and the previous release's table empty."""
        return self._delivered is None and self._dead is None and self._mover.done

    def begin(self) -> float | None:
        """At the worker's start: the slot period follows --retain-delivered; returns it (None: retention off)."""
        if self._delivered is None:
            return None
        self._follow_period()
        return self._period

    def _follow_period(self) -> None:
        """Run the database's setter of the period; logged when the period in force changes. The setter leaves the
        period as it is while a transaction writing events holds the table (half a second at most): each run
        tries again."""
        with self._engine.begin() as conn:
            period = conn.execute(queries.SET_SLOT_PERIOD, {"retain_s": self._delivered.total_seconds()}).scalar_one()
        if period != self._period:
            event(log, logging.INFO, "retention: slot period set", period_s=round(period, 1),
                  retain_delivered_s=self._delivered.total_seconds())
            self._period = period

    def move_legacy(self) -> None:
        """The legacy mover's batches alone (at the worker's start: an upgrade's rows should not wait a run)."""
        self._mover.run()

    def next_run_in(self, every: float) -> float:
        """Seconds to the next run: `every`, or sooner when a row of the previous release's worker comes free (its
        lease runs out), so the events it left wait for their lease and a second, not for the next interval."""
        lease_end = self._mover.next_lease_end()
        return every if lease_end is None else min(every, max(1.0, lease_end + 1.0))

    def run(self) -> Purged:
        """One run: the legacy mover's batches, then what is past retention; logged, and returned."""
        self._mover.run()
        purged = Purged()
        if self._delivered is not None:
            if self._period is not None:  # begun: the period follows the retention, once the table lets it
                self._follow_period()
            purged = purge_delivered(self._engine, self._delivered, self._batch_size)
        if self._dead is not None:
            purged = replace(purged, dead=purge_dead(self._engine, self._dead, self._batch_size, sys.maxsize))
        _log_run(purged)
        return purged


def _log_run(purged: Purged) -> None:
    for slot, events in purged.truncated.items():
        event(log, logging.INFO, "retention: slot truncated", partition=f"fp_outbox_events_s{slot:02d}",
              events=events)
    if purged.kept:  # once a run, every slot old enough that stays, and why
        event(log, logging.INFO, "retention: slots kept past retention", **{
            f"fp_outbox_events_s{slot:02d}": f"{why}: {KEPT[why]}" for slot, why in sorted(purged.kept.items())})
    if purged.claims or purged.retries or purged.legacy or purged.dead:
        event(log, logging.INFO, "purged old rows", claims=purged.claims, delivered_retries=purged.retries,
              legacy_delivered=purged.legacy, dead=purged.dead)


def start_retention(engine: Engine, delivered: timedelta | None, dead: timedelta | None,
                    stopping: threading.Event) -> threading.Thread:
    """On a daemon thread: set the slot period and move the previous release's rows at once, then run retention
    (and the mover) about once a minute, until `stopping` or until nothing is left for it to do."""
    retention = Retention(engine, delivered, dead)
    # Half the shortest retention age for short ones (tests, demos), so rows never outstay it by much.
    every = min([RETENTION_EVERY] + [max(1.0, age.total_seconds() / 2) for age in (delivered, dead) if age])
    thread = threading.Thread(target=_retain, args=(retention, every, stopping), name="fp-outbox-retention",
                              daemon=True)
    thread.start()
    return thread


def _retain(retention: Retention, every: float, stopping: threading.Event) -> None:
    # At start only the slot period and the legacy mover (a few statements): the first purge waits its interval,
    # so a worker's start-up costs the database next to nothing, and a fleet's restart no burst of purges.
    begun = False
    while not retention.finished:
        try:
            if begun:
                retention.run()
            else:
                retention.begin()
                retention.move_legacy()
                begun = True
        except SQLAlchemyError as exc:
            event(log, logging.WARNING, "retention failed; trying again later", error=first_line(exc))
        try:
            wait = retention.next_run_in(every)
        except SQLAlchemyError:
            wait = every
        if stopping.wait(wait):
            return
