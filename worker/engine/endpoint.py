"""The endpoint's health, shared by every worker of the database (fp_outbox_endpoint): an outage is the
endpoint's, not the events'. When recent sends all failed for reasons no event causes (5xx, 408, no connection,
no answer in time) over several events, the endpoint is declared down: no claim takes a row (the claim reads the
state), nothing is re-sent in process, and what comes back gives its attempt back and pushes no backoff. One
worker at a time sends one waiting event as a probe, --retry-base apart doubling to min(--retry-cap, 30 s). The
first answer ends the outage for all, and every waiting row is due at once. One log line at each change."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque

from worker.engine.logs import event, log
from worker.engine.metrics import Metrics
from worker.engine.policy import Outcome, Retry, endpoint_failed
from worker.engine.settings import Settings
from worker.engine.store import Claimed, DatabaseUnavailable, Store

OUTAGE_AFTER = 5  # sends in a row that failed for the endpoint's own reasons ...
OUTAGE_EVENTS = 3  # ... over at least this many events: one event that keeps failing is not an outage
PROBE_CAP = 30.0  # seconds: the longest wait between probes (shorter if --retry-cap is)
PROBE_POLL = 0.5  # seconds: how often a worker asks for the probe lease while the endpoint is down


class Endpoint:
    """This worker's view of the endpoint, and its part in the shared state. Only the loop's thread changes it;
    the sending threads read `down` and holds()."""

    def __init__(self, store: Store, settings: Settings, metrics: Metrics, stopping: threading.Event,
                 clock=time.monotonic) -> None:
        self._store = store
        self._stopping = stopping
        self._metrics = metrics
        self._clock = clock
        self._base = settings.backoff.base.total_seconds()
        self._cap = min(PROBE_CAP, settings.backoff.cap.total_seconds())
        self._failures: deque[int] = deque(maxlen=OUTAGE_AFTER)  # row ids of the failed sends in a row
        self._probes = 0  # probes that failed in this outage, as the lease said
        self._asked_at = -PROBE_POLL
        self.down = False
        self.probe_row: int | None = None

    def observe(self, row: Claimed, outcome: Outcome) -> None:
        """One send's outcome: a run of failures over several events declares an outage; an answer ends it."""
        if row.id == self.probe_row:
            self._probe_answered(outcome)
            return
        failed = endpoint_failed(outcome)
        if failed is None or (failed and self._stopping.is_set()):
            return  # a worker on its way out declares no outage: it would not be there to probe
        if not failed:
            self._failures.clear()
            if self.down:
                self._up()
            return
        self._failures.append(row.id)
        if not self.down and len(self._failures) == OUTAGE_AFTER and len(set(self._failures)) >= OUTAGE_EVENTS:
            self._down(outcome.reason)

    def counted(self, outcome: Outcome) -> Outcome:
        """The outcome to settle: while the endpoint is down a retry gives its attempt back and waits no backoff."""
        if self.down and isinstance(outcome, Retry):
            return dataclasses.replace(outcome, counted=False)
        return outcome

    def holds(self, row_id: int) -> bool:
        """Whether a send for this row must not start now: the endpoint is down and it is not the probe."""
        return self.down and row_id != self.probe_row

    def learned(self, down: bool) -> None:
        """The state as a claim just read it (another worker may have changed it)."""
        if down != self.down:
            self._set(down)

    def probe_due(self) -> bool:
        """While down: whether this worker should send the probe now (it took the lease); asks at most every
        PROBE_POLL seconds, and never while its own probe is in flight."""
        now = self._clock()
        if not self.down or self.probe_row is not None or now - self._asked_at < PROBE_POLL:
            return False
        self._asked_at = now
        try:
            probes = self._store.take_probe(self._base, self._cap)
        except DatabaseUnavailable:
            return False
        if probes is None:
            return False
        self._probes = probes
        return True

    def probing(self, row_id: int | None) -> None:
        """The probe claimed `row_id`, or nothing (no event waits: the lease goes back, to try again soon)."""
        if row_id is None:
            self._give_probe_back(failed=False, retry_in=self._base)
        else:
            self.probe_row = row_id

    def _probe_answered(self, outcome: Outcome) -> None:
        self.probe_row = None
        failed = endpoint_failed(outcome)
        if failed is False:
            self._up()
        elif failed is None:  # it said nothing of the endpoint (an unsendable event): probe again at once
            self._give_probe_back(failed=False, retry_in=0.0)
        else:
            self._give_probe_back(failed=True, reason=getattr(outcome, "reason", None))

    def probe_interval(self, failed_probes: int) -> float:
        """Seconds from one probe's start to the next after `failed_probes` failed ones (the database computes
        the same in TAKE_PROBE): doubling from --retry-base, at most min(--retry-cap, 30 s)."""
        return min(self._cap, self._base * 2 ** min(failed_probes, 32))

    def _down(self, reason: str) -> None:
        self._set(True)
        try:
            declared = self._store.declare_endpoint_down(reason[:200], self.probe_interval(0))
        except DatabaseUnavailable:
            return  # the next claim reads the shared state again
        if declared:
            event(log, logging.WARNING, "the endpoint is down: every recent request failed; sending nothing but "
                  "a probe until it answers (attempts are not counted meanwhile)", reason=reason,
                  failed_requests=OUTAGE_AFTER, first_probe_in_s=self.probe_interval(0))

    def _up(self) -> None:
        self._set(False)
        try:
            down_s, made_due = self._store.declare_endpoint_up()
        except DatabaseUnavailable:
            return  # still down for the others: the next probe ends it
        if down_s is not None:
            event(log, logging.INFO, "the endpoint answers again; every waiting event is due now",
                  down_s=round(down_s, 1), made_due=made_due)

    def _give_probe_back(self, failed: bool, retry_in: float = 0.0, reason: str | None = None) -> None:
        try:
            self._store.probe_done(failed, retry_in, reason[:200] if reason else None)
        except DatabaseUnavailable:
            pass  # the lease ends by itself at probe_until

    def _set(self, down: bool) -> None:
        self.down = down
        self._failures.clear()
        if not down:
            self.probe_row = None
        self._metrics.set_endpoint_up(not down)
