"""The shared rate budget as one worker takes it: slices of the schedule all workers share (a sequence in the
database, migrations 0003 and 0004), for a claim's rows or for one more request, and what the worker does with a
slice: wait for its start, and know its end (a request must start within it, worker.engine.sender)."""

from __future__ import annotations

import logging
import time

from worker.engine.logs import event, log
from worker.engine.metrics import Metrics
from worker.engine.services import StopSignal
from worker.engine.settings import Settings
from worker.engine.store import Grant, Store

# The limiter grants permits in chunks of at most 1/200 of the rate, and workers aim at 96% of
# it: a chunk sent at once overshoots a smooth schedule by at most one chunk, and this headroom
# also absorbs what lies between the grant and the request's arrival: a request starts within its
# slice or takes a new one (worker.engine.sender.SLICE_TOLERANCE), and what remains is the scheduling
# of the sending thread and of the receiver, a few ms.
RATE_HEADROOM = 0.96
CHUNK_FRACTION = 1 / 200


class Permits:
    """This worker's way to the shared rate budget: the rate it aims at and the chunk it claims at most."""

    def __init__(self, store: Store, settings: Settings, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self.rate = settings.rate_limit * RATE_HEADROOM
        self.chunk = max(1, int(settings.rate_limit * CHUNK_FRACTION))
        # How far ahead the schedule can legitimately run: a 429's pause at its longest, then grants that are
        # waited for (a claim's up to half the lease, a re-send's up to the lease).
        self.lead_limit = settings.backoff.retry_after_cap.total_seconds() + settings.lease.total_seconds()

    def take(self, count: int, max_wait: float) -> float | None:
        """Reserve `count` requests of the shared budget (a re-send, or a request that missed its slice) and
        wait until their slice starts, unless that is more than `max_wait` seconds away (what the row's lease
        can spare): then None at once. Returns the slice's end (time.monotonic())."""
        grant = self._store.acquire_permits(count, self.rate)
        if self.runaway(grant):
            grant = self._store.acquire_permits(count, self.rate)
        ends = self.slice_ends(grant)
        if grant.wait_s > max_wait:
            return None
        if grant.wait_s > 0:
            self._metrics.waited_for_rate_limit(grant.wait_s)
            time.sleep(grant.wait_s)
        return ends

    def runaway(self, grant: Grant) -> bool:
        """True if `grant` starts further ahead than the schedule can legitimately run: the database's clock
        stepped back (or a failover brought a host whose clock is behind). The schedule is then put back to the
        clock (by this worker, or another one that saw it first), and the grant is void."""
        if grant.wait_s <= self.lead_limit:
            return False
        ahead = self._store.reset_permits(self.lead_limit)
        if ahead is not None:
            event(log, logging.WARNING, "the shared rate schedule was far ahead of the database's clock (its clock "
                  "stepped back?); it starts again now", ahead_s=round(ahead, 1), limit_s=round(self.lead_limit, 1))
        return True

    def slice_ends(self, grant: Grant) -> float:
        """When the slice of a grant just received ends (time.monotonic()): its requests must start by then."""
        return time.monotonic() + grant.wait_s + grant.count / self.rate

    def wait_out(self, wait: float, stopping: StopSignal) -> bool:
        """Wait the `wait` seconds a claim's permits start after (feeding the watchdog); True if stopped meanwhile."""
        self._metrics.waited_for_rate_limit(wait)
        return wait > 0 and stopping.pause(wait)
