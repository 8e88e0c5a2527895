"""Settling: collecting the outcomes of finished sends and writing them back in batches, one statement per
kind (delivered, retry later, dead), each touching only rows this worker still holds."""

from __future__ import annotations

import logging
import time
from collections import Counter

from worker.engine.inflight import InFlight
from worker.engine.logs import event, log
from worker.engine.metrics import Metrics
from worker.engine.policy import Dead, Delivered, Outcome, Retry
from worker.engine.services import DatabaseHealth
from worker.engine.settings import Settings
from worker.engine.store import Claimed, DatabaseUnavailable, Store

SETTLE_DELAY = 0.05  # seconds an outcome may wait to be settled together with others


class Settler:
    """Holds outcomes until a chunk of them, or SETTLE_DELAY, has gathered, then settles them; keeps totals."""

    def __init__(self, settings: Settings, store: Store, in_flight: InFlight, metrics: Metrics,
                 health: DatabaseHealth, chunk: int) -> None:
        self._settings = settings
        self._store = store
        self._in_flight = in_flight
        self._metrics = metrics
        self._health = health
        self._chunk = chunk
        self._outcomes: list[tuple[Claimed, Outcome]] = []
        self._oldest_outcome = 0.0
        self.totals: Counter[str] = Counter()

    @property
    def unsettled(self) -> int:
        """Outcomes waiting to be settled (many only while settling fails)."""
        return len(self._outcomes)

    @property
    def backlogged(self) -> bool:
        """Settling is failing: claim nothing more until it catches up."""
        return len(self._outcomes) > 4 * self._settings.concurrency

    def collect(self, timeout: float) -> None:
        """Take the outcomes of every finished send, waiting up to `timeout` seconds for the first."""
        for row, outcome in self._in_flight.finished(timeout):
            self.record(row, outcome)

    def record(self, row: Claimed, outcome: Outcome) -> None:
        """Hold one row's outcome for the next settle."""
        if not self._outcomes:
            self._oldest_outcome = time.monotonic()
        self._outcomes.append((row, outcome))

    def settle(self, force: bool = False) -> None:
        """Settle the held outcomes if forced, a chunk has gathered or the oldest waited SETTLE_DELAY."""
        if not self._outcomes:
            return
        waited = time.monotonic() - self._oldest_outcome
        if not (force or len(self._outcomes) >= self._chunk or waited >= SETTLE_DELAY):
            return
        outcomes, self._outcomes = self._outcomes, []
        try:
            self._apply(outcomes)
            self._health.ok()
        except DatabaseUnavailable as exc:
            self._outcomes = outcomes + self._outcomes  # settle again later; the lease still holds them
            self._health.trouble(exc)

    def _apply(self, outcomes: list[tuple[Claimed, Outcome]]) -> None:
        delivered, retry, dead = split_outcomes(outcomes, self._settings)
        held = self._store.mark_delivered([r.id for r, _ in delivered], [o.status for _, o in delivered])
        held += self._store.schedule_retry([r.id for r, _, _ in retry], [d for _, _, d in retry],
                                           [o.status for _, o, _ in retry], [o.reason for _, o, _ in retry])
        held += self._store.mark_dead([r.id for r, _ in dead], [o.status for _, o in dead],
                                      [o.reason for _, o in dead])
        self._pause_on_429(outcomes)
        self._count(delivered, retry, dead)
        self._log(retry, dead, lost=len(outcomes) - held)

    def _pause_on_429(self, outcomes: list[tuple[Claimed, Outcome]]) -> None:
        pauses = [o.retry_after or 1.0 for _, o in outcomes if isinstance(o, Retry) and o.status == 429]
        if pauses:
            cap = self._settings.backoff.retry_after_cap.total_seconds()
            self._store.pause_all(min(max(pauses), cap))

    def _count(self, delivered: list, retry: list, dead: list) -> None:
        self.totals.update(delivered=len(delivered), retried=len(retry), dead=len(dead))
        self._metrics.delivered(len(delivered))
        for _, outcome, _ in retry:
            self._metrics.retried(outcome.reason, outcome.status)
        for _, outcome in dead:
            self._metrics.dead(outcome.reason, outcome.status)

    def _log(self, retry: list, dead: list, lost: int) -> None:
        for row, outcome in dead:
            event(log, logging.WARNING, "event dead", id=row.id, status=outcome.status, reason=outcome.reason)
        if retry:
            row, outcome, delay = retry[0]
            event(log, logging.INFO, "retry scheduled", count=len(retry), first_id=row.id,
                  first_reason=outcome.reason, first_delay_s=round(delay, 3))
        if lost > 0:
            event(log, logging.WARNING, "lease lost before settling; another worker owns those rows now",
                  lost=lost)


def split_outcomes(outcomes: list[tuple[Claimed, Outcome]], settings: Settings) -> tuple[list, list, list]:
    """Sort outcomes into the three settle statements; exhausted retries become dead."""
    delivered, retry, dead = [], [], []
    for row, outcome in outcomes:
        if isinstance(outcome, Delivered):
            delivered.append((row, outcome))
        elif isinstance(outcome, Retry) and settings.backoff.exhausted(row.attempts):
            dead.append((row, Dead(f"gave up after {row.attempts} attempts: {outcome.reason}", outcome.status)))
        elif isinstance(outcome, Retry):
            retry.append((row, outcome, settings.backoff.delay(row.attempts, outcome.retry_after)))
        else:
            dead.append((row, outcome))
    return delivered, retry, dead
