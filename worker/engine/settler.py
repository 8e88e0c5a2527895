"""Settling: collecting the outcomes of finished sends and writing them back in batches, one statement per
kind (delivered, retry later, dead), each touching only rows this worker still holds."""

from __future__ import annotations

import logging
import time
from collections import Counter

from worker.engine.endpoint import Endpoint
from worker.engine.health import DatabaseHealth
from worker.engine.inflight import InFlight
from worker.engine.logs import event, log
from worker.engine.metrics import Metrics
from worker.engine.outcomes import Unwritten, Written, write
from worker.engine.policy import Outcome, Retry
from worker.engine.settings import Settings
from worker.engine.store import Claimed, DatabaseUnavailable, Settled, Store

SETTLE_DELAY = 0.05  # seconds an outcome may wait to be settled together with others
TOTALS = {"delivered": "delivered", "retry": "retried", "dead": "dead"}  # outcome kind -> key of Settler.totals


class Settler:
    """Holds outcomes until a chunk of them, or SETTLE_DELAY, has gathered, then settles them; keeps totals."""

    def __init__(self, settings: Settings, store: Store, in_flight: InFlight, metrics: Metrics,
                 health: DatabaseHealth, chunk: int, endpoint: Endpoint) -> None:
        self._settings = settings
        self._endpoint = endpoint
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
            self._endpoint.observe(row, outcome)  # an outage is the endpoint's: its retries count no attempt
            self.record(row, self._endpoint.counted(outcome))

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
        except Unwritten as exc:
            self._outcomes = exc.outcomes + self._outcomes  # settle again later (settling twice changes nothing)
            self._health.trouble(exc)
        except DatabaseUnavailable as exc:  # only the 429 pause was lost; the next 429 sets it again
            self._health.trouble(exc)

    def _apply(self, outcomes: list[tuple[Claimed, Outcome]]) -> None:
        batch, written = write(self._store, outcomes, self._settings)
        self._report(batch, written)
        self._pause_on_429(outcomes)

    def _report(self, batch: list[Settled], written: Written) -> None:
        """Count and log what was settled: totals, metrics, dead events, retries, refusals, lost leases."""
        for one in batch:
            self._count(one)
        self._log(batch)
        if written.dead_lettered or written.unstorable:
            first_id, first_error = (written.dead_lettered or written.unstorable)[0]
            event(log, logging.WARNING, "could not record some outcomes; dead-lettered them instead",
                  dead_lettered=len(written.dead_lettered), unstorable=len(written.unstorable),
                  first_id=first_id, first_error=first_error)
        lost = len(batch) - written.held - len(written.unstorable)
        if lost > 0:
            event(log, logging.WARNING, "lease lost before settling; another worker owns those rows now",
                  lost=lost)

    def _count(self, one: Settled) -> None:
        self.totals[TOTALS[one.kind]] += 1
        if one.kind == "delivered":
            self._metrics.delivered(1)
            self._metrics.delivered_after([one.row.created_at])
        elif one.kind == "retry":
            self._metrics.retried(one.error, one.status)
        else:
            self._metrics.dead(one.error, one.status)

    @staticmethod
    def _log(batch: list[Settled]) -> None:
        retries = [one for one in batch if one.kind == "retry"]
        for one in batch:
            if one.kind == "dead":
                event(log, logging.WARNING, "event dead", id=one.row.id, status=one.status, reason=one.error)
        if retries:
            event(log, logging.INFO, "retry scheduled", count=len(retries), first_id=retries[0].row.id,
                  first_reason=retries[0].error, first_delay_s=round(retries[0].delay, 3))

    def _pause_on_429(self, outcomes: list[tuple[Claimed, Outcome]]) -> None:
        pauses = [o.retry_after or 1.0 for _, o in outcomes if isinstance(o, Retry) and o.status == 429]
        if pauses:
            cap = self._settings.backoff.retry_after_cap.total_seconds()
            self._store.pause_all(min(max(pauses), cap))
