"""The loop's backoff while the database is unavailable, longer after each failure in a row; and a read-only
database (a failover in progress), said once, shown by a gauge, and waited out on new connections."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from worker.engine.logs import event, log
from worker.engine.metrics import Metrics
from worker.engine.services import StopSignal
from worker.engine.store import DatabaseReadOnly


class DatabaseHealth:
    """Backs the loop off after each failed database step, longer after each failure in a row. A read-only
    database (a failover in progress) is said once, shown by a gauge, and waited out on new connections."""

    def __init__(self, stopping: StopSignal, metrics: Metrics | None = None,
                 reconnect: Callable[[], None] | None = None) -> None:
        self._stopping = stopping
        self._metrics = metrics
        self._reconnect = reconnect or (lambda: None)
        self.failures = 0
        self.read_only_since: float | None = None  # time.monotonic() of the first read-only refusal in a row

    def ok(self, wrote: bool = True) -> None:
        """A database step succeeded. Only one that wrote proves a read-only database takes writes again: a claim
        that found nothing wrote nothing, and succeeds on a read-only one too."""
        self.failures = 0
        if self.read_only_since is not None and wrote:
            event(log, logging.INFO, "the database accepts writes again; delivering",
                  read_only_s=round(time.monotonic() - self.read_only_since, 1))
            self._set_read_only(None)

    def trouble(self, exc: Exception) -> None:
        """A database step failed: log it and wait (jittered, doubling, at most 30 s), feeding the watchdog."""
        self.failures += 1
        delay = min(30.0, 0.25 * 2 ** min(self.failures, 8)) * (0.5 + random.random() / 2)
        if isinstance(exc, DatabaseReadOnly):
            self._read_only(exc, delay)
        else:
            event(log, logging.WARNING, "database unavailable, backing off", error=str(exc),
                  retry_in_s=round(delay, 2), failures=self.failures)
        self._stopping.pause(delay)

    def _read_only(self, exc: DatabaseReadOnly, delay: float) -> None:
        # The pooled connections may still lead to the demoted primary: the next ones look the host up anew.
        self._reconnect()
        if self.read_only_since is None:
            event(log, logging.WARNING, "the database is read-only; waiting for a primary (reconnecting with "
                  "backoff, nothing is lost meanwhile)", error=str(exc), retry_in_s=round(delay, 2))
            self._set_read_only(time.monotonic())

    def _set_read_only(self, since: float | None) -> None:
        self.read_only_since = since
        if self._metrics is not None:
            self._metrics.set_database_read_only(since is not None)
