"""What serves the delivery cycle from beside it: the stop signal, whose waits keep feeding the systemd
watchdog, and the side services (Prometheus /metrics and its queue gauges, the retention thread, a summary line a
minute). The backoff while the database is unavailable is worker.engine.health's."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from worker.engine.logs import event, first_line, log
from worker.engine.metrics import Metrics
from worker.engine.notify import Notifier
from worker.engine.retention import start_retention
from worker.engine.settings import Settings

SUMMARY_EVERY = 60.0
QUEUE_GAUGES_EVERY = 15.0  # seconds between the queue-depth reads behind /metrics
# Seconds between keepalives in a wait: well inside any watchdog interval systemd allows (1 s and up).
KEEPALIVE_EVERY = 0.5


class StopSignal(threading.Event):
    """Set once, from a signal handler, to wind the worker down; its waits end at once when it is, and feed
    the systemd watchdog (and the loop's other duties while idle, such as reading notifications) meanwhile."""

    def __init__(self, notifier: Notifier) -> None:
        super().__init__()
        self._notifier = notifier
        self._loop_thread = threading.current_thread()
        self._duties: list[Callable[[], None]] = []

    def also_while_waiting(self, duty: Callable[[], None]) -> None:
        """Run `duty` (cheap, non-blocking) at every keepalive of the loop's own thread."""
        self._duties.append(duty)

    def keepalive(self) -> None:
        """Feed the watchdog; on the loop's thread, also do the waiting duties."""
        self._notifier.watchdog()
        if threading.current_thread() is self._loop_thread:
            for duty in self._duties:
                duty()

    def pause(self, seconds: float) -> bool:
        """Wait up to `seconds` (True if stopped meanwhile), keeping alive every KEEPALIVE_EVERY seconds."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.wait(min(left, KEEPALIVE_EVERY)):
                return True
            self.keepalive()
        return self.is_set()


class SideServices:
    """/metrics with its gauges, retention and the minute's summary, as the settings ask for them."""

    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics, stopping: StopSignal) -> None:
        self._settings = settings
        self._engine = engine
        self._metrics = metrics
        self._stopping = stopping
        self._gauges_read_at = 0.0
        self._last_summary = (time.monotonic(), Counter())

    def start(self) -> None:
        """Serve /metrics if configured; start retention, always (it moves an upgrade's legacy rows too)."""
        self._metrics.set_rate_limit(self._settings.rate_limit)
        if self._settings.metrics_port:
            port = self._metrics.start_http_server(self._settings.metrics_port)
            event(log, logging.INFO, "metrics served", port=port, path="/metrics")
        start_retention(self._engine, self._settings.retain_delivered, self._settings.retain_dead, self._stopping)

    def refresh_gauges(self, in_flight: int) -> None:
        """Set the in-flight gauge; read the queue gauges from the database every QUEUE_GAUGES_EVERY seconds."""
        self._metrics.set_in_flight(in_flight)
        now = time.monotonic()
        if not self._settings.metrics_port or now - self._gauges_read_at < QUEUE_GAUGES_EVERY:
            return
        self._gauges_read_at = now
        try:
            self._metrics.refresh_queue(self._engine)
        except SQLAlchemyError as exc:  # a scrape with stale gauges beats a stalled loop
            event(log, logging.DEBUG, "queue gauges not refreshed", error=first_line(exc))

    def summarise(self, totals: Counter, in_flight: int) -> None:
        """Log what the last minute delivered, retried and killed, if anything happened."""
        since, before = self._last_summary
        now = time.monotonic()
        if now - since < SUMMARY_EVERY:
            return
        delta = totals - before
        if delta or in_flight:
            event(log, logging.INFO, "summary", interval_s=round(now - since), **delta, in_flight=in_flight)
        self._last_summary = (now, totals.copy())

    def stop(self) -> None:
        """Stop serving /metrics (the retention thread ends with the stop signal)."""
        self._metrics.stop_http_server()
