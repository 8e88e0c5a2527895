"""Claiming events and starting their sends: the next events past the shared position, or retries that are due
(worker.engine.paths); each claim also reserves its share of the shared rate budget (the permits,
worker.engine.permits), in the same statement, and the events it returns go to the pool at once (the 'start'
step). While the endpoint is down (worker.engine.endpoint) a claim takes nothing but, when this worker holds the
probe lease, one probe."""

from __future__ import annotations

import time

from worker.engine.endpoint import Endpoint
from worker.engine.health import DatabaseHealth
from worker.engine.inflight import InFlight
from worker.engine.paths import Paths
from worker.engine.permits import Permits
from worker.engine.policy import Dead, Retry
from worker.engine.services import StopSignal
from worker.engine.settings import Settings
from worker.engine.settler import Settler
from worker.engine.store import Claimed, DatabaseUnavailable, Grant, Store

RELEASED = "not sent: released when the worker stopped; due again at once"
PAUSED = "not sent: every worker paused after a 429; due again at once"
RESCHEDULED = "not sent: the shared rate schedule was put back to the clock; due again at once"


class Claimer:
    """Claims up to a chunk of due rows whenever enough sending slots are free, and starts sending them."""

    def __init__(self, settings: Settings, store: Store, permits: Permits, in_flight: InFlight, settler: Settler,
                 health: DatabaseHealth, stopping: StopSignal, endpoint: Endpoint) -> None:
        self._settings = settings
        self._store = store
        self._permits = permits
        self._in_flight = in_flight
        self._settler = settler
        self._health = health
        self._stopping = stopping
        self._endpoint = endpoint
        # A claim waits until half the slots are free (a quarter until 0.4.0: claims of about 14 events; bench drain
        # went from 2,812/s at 411 µs an event to about 3,000/s at 386 µs with claims twice that size).
        self._claim_at_least = max(1, min(permits.chunk, settings.concurrency // 2))
        self.paths = Paths(store)

    def claim_and_start(self) -> int:
        """Claim what is due and fits the free slots, and start sending it; returns how many rows were claimed."""
        free = self._settings.concurrency - len(self._in_flight)
        if self._settler.backlogged or (self._in_flight and free < self._claim_at_least) or free <= 0:
            return 0
        probe = self._endpoint.probe_due()
        claimed_at = time.monotonic()  # the lease starts no earlier than this
        try:
            rows, grant = self.paths.claim(1 if probe else min(free, self._permits.chunk), self._permits.rate, probe,
                                           down=self._endpoint.down)
            self._health.ok(wrote=bool(rows))  # an empty claim writes nothing: it proves no end of read-only
        except DatabaseUnavailable as exc:
            self._health.trouble(exc)
            return 0  # anything claimed comes back when its lease expires (the probe lease too)
        self._endpoint.learned(self._store.endpoint_down)
        if probe:
            self._endpoint.probing(rows[0].id if rows else None)
        if not rows:
            return 0
        return self._start(rows, grant, claimed_at + self._settings.lease.total_seconds())

    def may_claim_again(self, started: int) -> bool:
        """A full chunk came back and slots are free: more may be due, so claim again without waiting."""
        free = self._settings.concurrency - len(self._in_flight)
        return started >= self._permits.chunk and free >= self._claim_at_least

    def release(self, rows: list[Claimed], why: str = RELEASED) -> None:
        """Hand claimed events back, due at once, their attempt given back: settled like any outcome (a retry not
        counted). If the database is away they stay to be settled later, or their leases bring them back."""
        for row in rows:
            self._settler.record(row, Retry(why, sent=False, counted=False))
        self._settler.settle(force=True)

    def _start(self, rows: list[Claimed], grant: Grant, lease_ends: float) -> int:
        wait, slice_ends = grant.wait_s, self._permits.slice_ends(grant)
        if self._permits.runaway(grant):  # claimed again at once, on the schedule put right
            self.release(rows, RESCHEDULED)
            return 0
        if wait > self._settings.lease.total_seconds() / 2:
            # A long global pause (after a 429): hand the rows back rather than sit on them.
            self.release(rows, PAUSED)
            self._stopping.pause(wait - 1.0)
            return 0
        if self._permits.wait_out(wait, self._stopping):
            self.release(rows)
            return 0
        for row in rows:
            if self._settings.backoff.exhausted(row.attempts - 1):
                self._settler.record(row, Dead(f"abandoned after {row.attempts - 1} claims without a result "
                                               "(its workers died or lost the lease while sending it)"))
                continue
            self._in_flight.start(row, lease_ends, slice_ends)
        return len(rows)
