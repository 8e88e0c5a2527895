"""The worker loop: claim due rows, send them concurrently, settle the outcomes in batches.

Claim and settle are short transactions; no transaction is open while HTTP is in progress.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg
from sqlalchemy import Engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from outbox.db import ConfigError, make_engine
from outbox.schema import NOTIFY_CHANNEL, events
from worker.engine.logs import event
from worker.engine.metrics import Metrics
from worker.engine.notify import Notifier
from worker.engine.policy import Dead, Delivered, Outcome, Retry
from worker.engine.retention import start_retention
from worker.engine.sender import Sender
from worker.engine.settings import Settings
from worker.engine.store import Claimed, DatabaseUnavailable, Store

log = logging.getLogger("fp_outbox.worker")

# The limiter grants permits in chunks of at most 1/200 of the rate, and workers aim at 96% of
# it: a chunk sent at once overshoots a smooth schedule by at most one chunk, and this headroom
# also absorbs a few tens of ms of jitter between the grant and the request's arrival.
RATE_HEADROOM = 0.96
CHUNK_FRACTION = 1 / 200
SETTLE_DELAY = 0.05  # seconds an outcome may wait to be settled together with others
SUMMARY_EVERY = 60.0
QUEUE_GAUGES_EVERY = 15.0  # seconds between the queue-depth reads behind /metrics


class StartupError(Exception):
    """The database stayed unreachable for the whole start-up timeout."""


class Worker:
    """One worker process's loop; `stop()` (from a signal handler) makes `run()` wind down."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        # No pre-ping: it would cost a round trip per transaction on the hot path. A connection the
        # server dropped fails one statement, which is retried after a backoff like any outage.
        self.engine = engine or make_engine(
            settings.database_url, pool_size=2, max_overflow=settings.concurrency + 2, pool_pre_ping=False
        )
        self.store = Store(self.engine, settings.owner, settings.lease.total_seconds(), settings.token)
        self.sender = Sender(settings, self.take_permit)
        self._rate = settings.rate_limit * RATE_HEADROOM
        self._chunk = max(1, int(settings.rate_limit * CHUNK_FRACTION))
        self._claim_at_least = max(1, min(self._chunk, settings.concurrency // 4))
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="fp-outbox-send")
        self._inflight: dict[Future, Claimed] = {}
        self._done: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self._outcomes: list[tuple[Claimed, Outcome]] = []
        self._oldest_outcome = 0.0
        self._stopping = threading.Event()
        self._db_failures = 0
        self._listener = Listener(self.engine)
        self.totals: Counter[str] = Counter()
        self._last_summary = (time.monotonic(), Counter())
        self.notifier = Notifier()
        self.metrics = Metrics()
        self._gauges_read_at = 0.0

    def stop(self) -> None:
        """Stop claiming; in-flight work is finished or released by run()."""
        self._stopping.set()

    def run(self) -> int:
        """Deliver until stopped (or, with drain, until nothing is pending or in flight). Returns 0."""
        self.wait_for_database()
        self._start_side_services()
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

    def _start_side_services(self) -> None:
        if self.settings.metrics_port:
            port = self.metrics.start_http_server(self.settings.metrics_port)
            event(log, logging.INFO, "metrics served", port=port, path="/metrics")
        if self.settings.retain_delivered:
            start_retention(self.engine, self.settings.retain_delivered, self._stopping)
        self.notifier.ready()  # connected, schema present: claiming starts now
        self.notifier.status("delivering")

    def _step(self) -> bool:
        """One turn of the loop; False when a drain is complete."""
        self.notifier.watchdog()
        self._refresh_gauges()
        self._collect(timeout=0)
        self._settle(force=not self._inflight)
        started = self._claim_and_start()
        self._maybe_summarise()
        if started >= self._chunk and self.settings.concurrency - len(self._inflight) >= self._claim_at_least:
            return True  # a full chunk and free slots: more may be due, claim again without waiting
        if self._inflight or started:
            self._collect(timeout=SETTLE_DELAY)
        elif self._outcomes:
            self._stopping.wait(SETTLE_DELAY)  # settling is failing: don't spin
        elif self.settings.drain and not self._unfinished():
            event(log, logging.INFO, "drained: nothing pending or in flight")
            return False
        else:
            self._listener.wait(self.settings.poll_interval.total_seconds(), self._stopping)
        return True

    # -- claim ---------------------------------------------------------------------------------
    def _claim_and_start(self) -> int:
        free = self.settings.concurrency - len(self._inflight)
        backlog = len(self._outcomes) > 4 * self.settings.concurrency  # settling is failing
        if backlog or (self._inflight and free < self._claim_at_least) or free <= 0:
            return 0
        try:
            rows, wait = self.store.claim(min(free, self._chunk), self._rate)
            self._db_failures = 0
            if not rows:
                return 0
        except DatabaseUnavailable as exc:
            self._database_trouble(exc)
            return 0  # anything claimed comes back when its lease expires
        return self._start(rows, wait)

    def _start(self, rows: list[Claimed], wait: float) -> int:
        if wait > self.settings.lease.total_seconds() / 2:
            # A long global pause (after a 429): hand the rows back rather than sit on them.
            self._release([row.id for row in rows])
            self._pause(wait - 1.0)
            return 0
        self.metrics.waited_for_rate_limit(wait)
        if wait > 0 and self._stopping.wait(wait):
            self._release([row.id for row in rows])
            return 0
        for row in rows:
            if self.settings.backoff.exhausted(row.attempts - 1):
                self._record(row, Dead(f"abandoned after {row.attempts - 1} claims without a result "
                                       "(its workers died or lost the lease while sending it)"))
                continue
            future = self._pool.submit(self._timed_send, row)
            self._inflight[future] = row
            future.add_done_callback(self._done.put)
        return len(rows)

    def take_permit(self, count: int) -> None:
        """Wait for `count` requests of the shared budget (used by in-process re-sends)."""
        wait = self.store.acquire_permits(count, self._rate)
        if wait > 0:
            self.metrics.waited_for_rate_limit(wait)
            time.sleep(wait)

    def _timed_send(self, row: Claimed) -> Outcome:
        started = time.perf_counter()
        try:
            return self.sender.send(row)
        finally:
            self.metrics.observe_send(time.perf_counter() - started)

    # -- send results --------------------------------------------------------------------------
    def _collect(self, timeout: float) -> None:
        try:
            future = self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait()
        except queue.Empty:
            return
        while True:
            row = self._inflight.pop(future)
            self._record(row, future.result())  # Sender.send never raises
            try:
                future = self._done.get_nowait()
            except queue.Empty:
                return

    def _record(self, row: Claimed, outcome: Outcome) -> None:
        if not self._outcomes:
            self._oldest_outcome = time.monotonic()
        self._outcomes.append((row, outcome))

    # -- settle --------------------------------------------------------------------------------
    def _settle(self, force: bool = False) -> None:
        if not self._outcomes:
            return
        due = force or len(self._outcomes) >= self._chunk or time.monotonic() - self._oldest_outcome >= SETTLE_DELAY
        if not due:
            return
        outcomes, self._outcomes = self._outcomes, []
        try:
            self._apply(outcomes)
            self._db_failures = 0
        except DatabaseUnavailable as exc:
            self._outcomes = outcomes + self._outcomes  # settle again later; the lease still holds them
            self._database_trouble(exc)

    def _apply(self, outcomes: list[tuple[Claimed, Outcome]]) -> None:
        delivered, retry, dead = _split(outcomes, self.settings)
        held = self.store.mark_delivered([r.id for r, _ in delivered], [o.status for _, o in delivered])
        held += self.store.schedule_retry([r.id for r, _, _ in retry], [d for _, _, d in retry],
                                          [o.status for _, o, _ in retry], [o.reason for _, o, _ in retry])
        held += self.store.mark_dead([r.id for r, _ in dead], [o.status for _, o in dead],
                                     [o.reason for _, o in dead])
        self._pause_on_429(outcomes)
        self.totals.update(delivered=len(delivered), retried=len(retry), dead=len(dead))
        self.metrics.delivered(len(delivered))
        for _, outcome, _ in retry:
            self.metrics.retried(outcome.reason, outcome.status)
        for _, outcome in dead:
            self.metrics.dead(outcome.reason, outcome.status)
        for row, outcome in dead:
            event(log, logging.WARNING, "event dead", id=row.id, status=outcome.status, reason=outcome.reason)
        if retry:
            row, outcome, delay = retry[0]
            event(log, logging.INFO, "retry scheduled", count=len(retry), first_id=row.id,
                  first_reason=outcome.reason, first_delay_s=round(delay, 3))
        if held < len(outcomes):
            event(log, logging.WARNING, "lease lost before settling; another worker owns those rows now",
                  lost=len(outcomes) - held)

    def _pause_on_429(self, outcomes: list[tuple[Claimed, Outcome]]) -> None:
        pauses = [o.retry_after or 1.0 for _, o in outcomes if isinstance(o, Retry) and o.status == 429]
        if pauses:
            cap = self.settings.backoff.retry_after_cap.total_seconds()
            self.store.pause_all(min(max(pauses), cap))

    # -- stop ----------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        self.notifier.stopping()
        self._listener.close()
        deadline = time.monotonic() + self.settings.shutdown_grace.total_seconds()
        while self._inflight and time.monotonic() < deadline:
            self._collect(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
        self._settle(force=True)
        leftover = [row.id for row in self._inflight.values()]
        if leftover:
            self._release(leftover)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop_http_server()
        event(log, logging.INFO, "worker stopped", **self.totals, released=len(leftover),
              unsettled=len(self._outcomes))
        self.notifier.close()

    def _release(self, ids: list[int]) -> None:
        try:
            self.store.release(ids)
        except DatabaseUnavailable as exc:
            event(log, logging.WARNING, "could not release rows; they return when their lease expires",
                  count=len(ids), error=str(exc))

    # -- database health -----------------------------------------------------------------------
    def wait_for_database(self) -> None:
        """Retry until the database answers and has the outbox table, or raise StartupError."""
        deadline = time.monotonic() + self.settings.startup_timeout.total_seconds()
        delay = 0.5
        while True:
            try:
                with self.engine.connect() as conn:
                    has_table = inspect(conn).has_table(events.name)
                break
            except Exception as exc:  # any failure to connect: keep trying until the deadline
                if time.monotonic() + delay > deadline or self._stopping.is_set():
                    raise StartupError(
                        f"could not reach the database within {self.settings.startup_timeout.total_seconds():.0f} s "
                        f"({_first_line(exc)}); check --database-url and that PostgreSQL is running"
                    ) from None
                event(log, logging.WARNING, "database not reachable yet, retrying", error=_first_line(exc),
                      retry_in_s=delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
        if not has_table:
            raise ConfigError("the outbox table does not exist in this database: run `fp-outbox migrate` first")

    def _database_trouble(self, exc: Exception) -> None:
        self._db_failures += 1
        delay = min(30.0, 0.25 * 2 ** min(self._db_failures, 8)) * (0.5 + random.random() / 2)
        event(log, logging.WARNING, "database unavailable, backing off", error=str(exc),
              retry_in_s=round(delay, 2), failures=self._db_failures)
        self._pause(delay)

    def _unfinished(self) -> bool:
        try:
            return self.store.anything_unfinished()
        except DatabaseUnavailable as exc:
            self._database_trouble(exc)
            return True

    def _pause(self, seconds: float) -> bool:
        """Wait up to `seconds` (True if stopped meanwhile), still feeding the systemd watchdog."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.wait(min(left, 1.0)):
                return True
            self.notifier.watchdog()
        return self._stopping.is_set()

    def _refresh_gauges(self) -> None:
        self.metrics.set_in_flight(len(self._inflight))
        now = time.monotonic()
        if not self.settings.metrics_port or now - self._gauges_read_at < QUEUE_GAUGES_EVERY:
            return
        self._gauges_read_at = now
        try:
            self.metrics.refresh_queue(self.engine)
        except SQLAlchemyError as exc:  # a scrape with stale gauges beats a stalled loop
            event(log, logging.DEBUG, "queue gauges not refreshed", error=_first_line(exc))

    def _maybe_summarise(self) -> None:
        since, before = self._last_summary
        now = time.monotonic()
        if now - since < SUMMARY_EVERY:
            return
        delta = self.totals - before
        if delta or self._inflight:
            event(log, logging.INFO, "summary", interval_s=round(now - since), **delta,
                  in_flight=len(self._inflight))
        self._last_summary = (now, self.totals.copy())


def _split(outcomes, settings: Settings):
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


class Listener:
    """LISTEN on the outbox channel so an idle worker wakes at commit; polling is the fallback."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: psycopg.Connection | None = None

    def wait(self, timeout: float, stopping: threading.Event) -> None:
        try:
            conn = self._connect()
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass
        except (psycopg.Error, SQLAlchemyError, OSError) as exc:
            self.close()
            event(log, logging.DEBUG, "listen connection lost; polling", error=_first_line(exc))
            stopping.wait(timeout)

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            raw = self._engine.raw_connection()
            conn = raw.driver_connection
            raw.detach()  # a long-lived connection of its own, outside the pool
            conn.autocommit = True
            self._conn = conn
            self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__
