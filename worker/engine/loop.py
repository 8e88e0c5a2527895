"""The worker: the delivery cycle of the README, claim -> send -> settle, turned by `Worker` out of small
parts (worker.engine.claimer, inflight, settler, lifecycle, services, listener).

Claim and settle are short transactions; no transaction is open while HTTP is in progress.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import Engine

from outbox.db import make_engine
from worker.engine.calls import Calls
from worker.engine.claimer import Claimer
from worker.engine.endpoint import Endpoint
from worker.engine.health import DatabaseHealth
from worker.engine.inflight import InFlight
from worker.engine.lifecycle import finish_or_release, wait_for_database
from worker.engine.idleflag import IdleFlag
from worker.engine.listener import Listener
from worker.engine.logs import event, log
from worker.engine.metrics import Metrics
from worker.engine.notify import Notifier
from worker.engine.permits import Permits
from worker.engine.sender import Sender
from worker.engine.services import SideServices, StopSignal
from worker.engine.settings import Settings
from worker.engine.settler import SETTLE_DELAY, Settler
from worker.engine.store import DatabaseUnavailable, Store
from worker.engine.timeouts import CallDeadlines
from worker.engine.tracing import Tracing, from_environment


class Worker:
    """One worker process's loop; `stop()` (from a signal handler) makes `run()` wind down.

    `sender` replaces the HTTP sender (anything with `send(Claimed) -> Outcome`), as the cycle benchmark does;
    `tracing` the one the OTEL_* variables configure (worker.engine.tracing.from_environment).
    """

    def __init__(self, settings: Settings, engine: Engine | None = None, *, sender=None,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        # No pre-ping: it would cost a round trip per transaction on the hot path. A connection the
        # server dropped fails one statement, which is retried after a backoff like any outage.
        self.engine = engine or make_engine(
            settings.database_url, pool_size=2, max_overflow=settings.concurrency + 2, pool_pre_ping=False,
            connect_args={"application_name": settings.application_name},  # counted in pg_stat_activity
        )
        self.deadlines = CallDeadlines()
        self.deadlines.attach(self.engine)  # the server's timeouts per transaction, and our own per call
        self.metrics = Metrics()
        self.tracing = tracing or from_environment()
        self.store = Store(self.engine, settings.owner, settings.lease.total_seconds(),
                           Calls(self.metrics, self.tracing))
        self.notifier = Notifier()
        self._stopping = StopSignal(self.notifier)
        self.health = DatabaseHealth(self._stopping, self.metrics, reconnect=self.engine.dispose)
        self.permits = Permits(self.store, settings, self.metrics)
        self.endpoint = Endpoint(self.store, settings, self.metrics, self._stopping)
        self.sender = sender or Sender(settings, self.permits.take, endpoint=self.endpoint)
        self.in_flight = InFlight(self.sender.send, settings.concurrency, self.metrics, self.tracing)
        self.settler = Settler(settings, self.store, self.in_flight, self.metrics, self.health, self.permits.chunk,
                               self.endpoint)
        self.claimer = Claimer(settings, self.store, self.permits, self.in_flight, self.settler, self.health,
                               self._stopping, self.endpoint)
        self.services = SideServices(settings, self.engine, self.metrics, self._stopping)
        self._listener = Listener(self.engine, self._stopping, self.deadlines.guard)
        self._idle = IdleFlag(self.engine)
        self._stopping.also_while_waiting(self._listener.drain)
        self.totals = self.settler.totals
        self._stopped_at = 0.0  # time.monotonic() of the stop

    def stop(self) -> None:
        """Stop claiming; in-flight work is finished or released by run(). The stop budget counts from the first
        call: every database call from then on, the one under way included, ends when its wind-down does."""
        self._stopped_at = self._stopped_at or time.monotonic()
        self._stopping.set()
        self.deadlines.cap(self._stopped_at + self.settings.stop_budget.wind_down)

    def run(self) -> int:
        """Deliver until stopped (or, with drain, until nothing is pending or in flight). Returns 0."""
        wait_for_database(self.engine, self.settings.startup_timeout, self._stopping)
        self.services.start()
        self.notifier.ready()  # connected, schema present: claiming starts now
        self.notifier.status("delivering")
        event(log, logging.INFO, "worker started", owner=self.settings.owner, endpoint=self.settings.endpoint,
              concurrency=self.settings.concurrency, rate_limit=self.settings.rate_limit,
              lease_s=self.settings.lease.total_seconds())
        try:
            while not self._stopping.is_set():
                if not self._step():
                    break
        finally:
            self._shutdown()
        return 0

    def _step(self) -> bool:
        """One turn of the cycle: claim, send, settle. False when a drain is complete."""
        self.notifier.watchdog()
        self._listener.drain()  # even while busy: a listener that is never read pins the server's queue
        self.services.refresh_gauges(len(self.in_flight))
        started = self.claimer.claim_and_start()  # claim due rows and start sending them on the pool
        self.services.summarise(self.totals, len(self.in_flight))
        if not self._wait_for_answers(started):
            return False
        self.settler.collect(timeout=0)  # settle what came back, in batches
        if not self._stopping.is_set():  # else the stop settles: one call fewer for its budget
            self.settler.settle(force=not self.in_flight)
        return True

    def _wait_for_answers(self, started: int) -> bool:
        """Collect answers as they come, or idle until a notification or the poll; False once drained."""
        if self.claimer.may_claim_again(started):
            return True  # a full chunk and free slots: more may be due, claim again without waiting
        if self.in_flight or started:
            self.settler.collect(timeout=SETTLE_DELAY)
        elif self.settler.unsettled:
            self._stopping.wait(SETTLE_DELAY)  # settling is failing: don't spin
        elif self.settings.drain and not self._unfinished():
            event(log, logging.INFO, "drained: nothing pending or in flight")
            return False
        else:
            poll = self.settings.poll_interval.total_seconds()
            if self._listener.delivers() and self._idle.say(poll):  # said just now: claim once more first
                self.health.ok()  # saying it wrote: a read-only database takes writes again
            else:
                self._listener.wait(self._idle.next_wait(poll))
        return True

    def _unfinished(self) -> bool:
        try:
            return self.store.anything_unfinished()
        except DatabaseUnavailable as exc:
            self.health.trouble(exc)
            return True

    def _shutdown(self) -> None:
        if not self._stopping.is_set():  # a drain that finished, or an error: the stop budget applies all the same
            self.stop()
        self.notifier.stopping()
        self._listener.close()
        released = finish_or_release(self.in_flight, self.settler, self.claimer, self.settings.stop_budget,
                                     self._stopped_at, self._stopping, self.deadlines)
        self.services.stop()
        event(log, logging.INFO, "worker stopped", **self.totals, released=released,
              unsettled=self.settler.unsettled)
        self.notifier.close()
