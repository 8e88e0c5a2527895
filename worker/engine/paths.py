"""The two ways rows are claimed (worker.engine.floor says why there are two): the fresh path above this worker's
floor, and the due path for everything else. Each fails on its own and backs off on its own, so a due path that
keeps failing (a statement that times out under a held horizon, a trigger that refuses retried rows) never
stops the fresh path, nor the other way round; the loop backs off as a whole only when both fail because the
database is unavailable."""

from __future__ import annotations

import logging
import time

from worker.engine.floor import MAX_PATH_BACKOFF, Floor, Sweeps
from worker.engine.logs import event, first_line, log
from worker.engine.store import Claimed, DatabaseRefused, DatabaseUnavailable, Grant, Store

Claim = tuple[list[Claimed], Grant]
NOTHING: Claim = ([], Grant.none())


class FreshPath:
    """Rows above the floor, from the primary key; the floor is read at the first claim (FIRST_FLOOR)."""

    name = "fresh"

    def __init__(self, store: Store, clock=time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self.floor: Floor | None = None
        self.failures = 0
        self._not_before = 0.0

    def ready(self) -> bool:
        return self._clock() >= self._not_before

    def claim(self, limit: int, rate: float, probe: bool) -> Claim:
        if self.floor is None:
            self.floor = Floor(self._store.first_floor())
        rows, grant, snapshot = self._store.claim_fresh(self.floor.value, limit, rate, probe=probe)
        self.floor.observe([row.id for row in rows], limit, snapshot)
        self.failures = 0
        return rows, grant

    def failed(self) -> float:
        self.failures += 1
        backoff = min(MAX_PATH_BACKOFF, 0.25 * 2 ** min(self.failures, 8))
        self._not_before = self._clock() + backoff
        return backoff


class DuePath:
    """Everything due that the fresh path does not take, oldest due first (CLAIM_SWEEP), paced by Sweeps."""

    name = "due"

    def __init__(self, store: Store, clock=time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self.sweeps = Sweeps(clock)

    @property
    def failures(self) -> int:
        return self.sweeps.failures

    def ready(self) -> bool:
        return self.sweeps.due()

    def claim(self, limit: int, rate: float, probe: bool) -> Claim:
        started = self._clock()
        rows, grant = self._store.claim_due(limit, rate, probe=probe)
        self.sweeps.swept(self._clock() - started, full=len(rows) >= limit)
        return rows, grant

    def failed(self) -> float:
        return self.sweeps.failed()


class Paths:
    """Chooses the path for each claim: while due rows wait (the due path's claims come back full) the two take
    turns, so due and fresh rows share the rate limit; a path with nothing falls through to the other."""

    def __init__(self, store: Store) -> None:
        self.fresh = FreshPath(store)
        self.due = DuePath(store)
        self._fresh_next = False

    def claim(self, limit: int, rate: float, probe: bool = False, down: bool = False) -> Claim:
        """Up to `limit` rows from the first path that has some; raises DatabaseUnavailable only when every path
        tried failed with it, and DatabaseRefused (no grant, no schema) at once. While the endpoint is `down` a
        claim only reads the state (the fresh path: nothing is claimed, the sweep's pacing is left alone); a
        `probe` tries both paths, paced or not, for its one row."""
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
