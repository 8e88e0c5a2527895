"""The two ways events are claimed. The fresh path takes the next events past the shared position, from the
insert-only event table (fp_outbox_claim_fresh): nearly every claim. The due path takes what failed, expired or
was released or requeued, from the retries (after settling the claims whose lease expired, so that their events
become retries): it runs at start, back to back while its claims come back full (due events go out at the rate
limit, like fresh ones, taking turns with them), and otherwise every max(1 s, 50 x its own last duration).

Each path fails on its own and backs off on its own, so a due path that keeps failing (a statement that times
out, a trigger that refuses retried rows) never stops the fresh path, nor the other way round; the loop backs
off as a whole only when every path it tried found the database unavailable."""

from __future__ import annotations

import logging
import time

from worker.engine.logs import event, first_line, log
from worker.engine.store import Claimed, DatabaseRefused, DatabaseUnavailable, Grant, Store

Claim = tuple[list[Claimed], Grant]
NOTHING: Claim = ([], Grant.none())
MIN_SWEEP_INTERVAL = 1.0  # seconds: the longest a due retry or an expired lease waits for its first claim ...
SWEEP_COST_FACTOR = 50.0  # ... unless the due path is slow: then 50x its duration, so it stays ~2 % of the time
MAX_PATH_BACKOFF = 30.0  # seconds: the longest a failing path waits before it is tried again
RECOVER_AT_ONCE = 100  # expired claims settled per sweep at most


def _backoff(failures: int) -> float:
    return min(MAX_PATH_BACKOFF, 0.25 * 2 ** min(failures, 8))


class FreshPath:
    """The next events past the shared position."""

    name = "fresh"

    def __init__(self, store: Store, clock=time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self.failures = 0
        self._not_before = 0.0

    def ready(self) -> bool:
        return self._clock() >= self._not_before

    def claim(self, limit: int, rate: float, probe: bool) -> Claim:
        rows, grant = self._store.claim_fresh(limit, rate, probe=probe)
        self.failures = 0
        return rows, grant

    def failed(self) -> float:
        self.failures += 1
        self._not_before = self._clock() + _backoff(self.failures)
        return _backoff(self.failures)


class DuePath:
    """Expired claims settled into retries, then the retries whose time came, oldest due first."""

    name = "due"

    def __init__(self, store: Store, clock=time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._next_at = clock()
        self.interval = MIN_SWEEP_INTERVAL
        self.hot = False  # the last due claim was full: more is due
        self.failures = 0

    def ready(self) -> bool:
        return self.hot or self._clock() >= self._next_at

    def claim(self, limit: int, rate: float, probe: bool) -> Claim:
        started = self._clock()
        if not self.hot:
            self._store.recover_expired(RECOVER_AT_ONCE)
        rows, grant = self._store.claim_due(limit, rate, probe=probe)
        self.swept(self._clock() - started, full=len(rows) >= limit)
        return rows, grant

    def swept(self, duration: float, full: bool) -> None:
        """A due claim just ended after `duration` seconds; `full`: it took all it asked for."""
        self.hot, self.failures = full, 0
        self.interval = max(MIN_SWEEP_INTERVAL, SWEEP_COST_FACTOR * duration)
        self._next_at = self._clock() + self.interval

    def failed(self) -> float:
        self.hot, self.failures = False, self.failures + 1
        self._next_at = self._clock() + _backoff(self.failures)
        return _backoff(self.failures)


class Paths:
    """Chooses the path for each claim: while due events wait (the due path's claims come back full) the two take
    turns, so due and fresh events share the rate limit; a path with nothing falls through to the other."""

    def __init__(self, store: Store) -> None:
        self.fresh = FreshPath(store)
        self.due = DuePath(store)
        self._fresh_next = False

    def claim(self, limit: int, rate: float, probe: bool = False, down: bool = False) -> Claim:
        """Up to `limit` events from the first path that has some; raises DatabaseUnavailable only when every path
        tried failed with it, and DatabaseRefused (no grant, no schema) at once. While the endpoint is `down` a
        claim only reads the state (the fresh path: nothing is claimed, the due path's pacing is left alone); a
        `probe` tries both paths, paced or not, for its one event."""
        if down and not probe:
            tried = [self.fresh]
        else:
            tried = [path for path in self._order() if probe or path.ready()]
        failures: list[tuple[object, Exception]] = []
        for path in tried:
            try:
                rows, grant = path.claim(limit, rate, probe)
            except DatabaseRefused:
                raise
            except Exception as exc:  # this path's trouble; the other one goes on
                path.failed()
                failures.append((path, exc))
                continue
            if rows:
                self._fresh_next = path is self.due
                self._report(failures)
                return rows, grant
        if failures and len(failures) == len(tried) and all(isinstance(e, DatabaseUnavailable) for _, e in failures):
            raise failures[-1][1]  # the database itself is away: the loop backs off as a whole, and says so
        self._report(failures)
        return NOTHING

    def _order(self) -> list:
        return [self.fresh, self.due] if self._fresh_next else [self.due, self.fresh]

    @staticmethod
    def _report(failures: list) -> None:
        """One line for a path's first failure in a row, then one every tenth."""
        for path, exc in failures:
            if path.failures != 1 and path.failures % 10:
                continue
            if isinstance(exc, DatabaseUnavailable):  # a lost connection, a statement that ran out of time
                event(log, logging.WARNING, "database unavailable, backing off", path=path.name, error=str(exc),
                      failures=path.failures)
            else:
                event(log, logging.WARNING, f"claiming {path.name} rows failed; the other path goes on",
                      error=f"{exc.__class__.__name__}: {first_line(exc)}", failures=path.failures)
