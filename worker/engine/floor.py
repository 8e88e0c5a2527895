"""Where a worker claims from: its floor (an id) for fresh rows, and when to sweep for everything else.

The fresh path claims rows with an id above the floor, from the primary key, so the dead row versions that
every claim and settle leave behind (below the floor) are never visited, however long another transaction
holds vacuum back. The floor may only pass an id once no transaction that could still commit a row with
that id is running. Ids come from a sequence: every id at or below the highest visible one (the head H)
was handed out before the claim's snapshot S was taken, so a row among them that S does not see belongs
to a transaction that was running at S (its xid is below S's xmax, X) or that had no xid yet (nextval runs
before the inserting transaction's first write assigns one). So a claim proposes M (the highest id it
claimed when it was full, else H) together with X; the floor moves to M once a later snapshot's xmin
reaches X: every transaction with an xid below X has ended by then. Read-only transactions (reports,
pg_dump) have no xid and never hold the floor back. A write transaction left open (a batch job, a session
idle in transaction) would hold it back for its whole life, and every fresh claim would then read all that
was delivered since; so a proposal is taken anyway once it has waited FLOOR_WAIT_CAP: a row of a
transaction that stayed open longer than that and commits after the floor passed it is found by the sweep.

The due path (the sweep) claims by due time from the partial index: retries that became due, expired leases,
released rows, claims that rolled back, requeued rows, and the rows of a transaction that committed after the
floor passed them. It runs at start, back to back while its claims come back full (so due rows go out at the
rate limit, like fresh ones, taking turns with them), and otherwise at least every interval, max(1 s, 50 x its
own last duration): under a held horizon it gets slower and so runs less often, costing at most ~2 % of the
time. A due row waits at most one interval for its first claim, then goes at the rate limit. A path that
fails backs off on its own; the other goes on.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

MIN_SWEEP_INTERVAL = 1.0  # seconds: the longest a due retry or an expired lease waits for the sweep ...
SWEEP_COST_FACTOR = 50.0  # ... unless the sweep is slow: then 50x its duration, so it stays ~2 % of the time
MAX_PROPOSALS = 8  # proposals kept while xmin is held back; beyond that a new one waits for a free place
FLOOR_WAIT_CAP = 1.0  # seconds a proposal waits for xmin: longer-lived transactions' late rows go to the sweep
FRESH_START_WINDOW = 10_000  # ids: a new floor starts at most this far below the head (older due rows: the sweep's)
MAX_PATH_BACKOFF = 30.0  # seconds: the longest a failing path (due or fresh) waits before it is tried again


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a claim statement's snapshot saw: the oldest running xid, the next xid, the highest visible id."""

    xmin: int
    xmax: int
    head: int | None


class Floor:
    """One worker's floor: the fresh path claims only ids above `value`. Pure bookkeeping."""

    def __init__(self, start: int, clock=time.monotonic) -> None:
        self.value = start
        self._clock = clock
        # (floor, xid every holder of an id <= it is below, when proposed)
        self._proposals: deque[tuple[int, int, float]] = deque()

    def observe(self, claimed_ids: list[int], limit: int, snapshot: Snapshot) -> None:
        """Record a fresh claim: propose its new floor, and move to every proposal this snapshot makes safe."""
        now = self._clock()
        proposed = max(claimed_ids) if len(claimed_ids) >= limit else snapshot.head
        highest = self._proposals[-1][0] if self._proposals else self.value
        if proposed is not None and proposed > highest and len(self._proposals) < MAX_PROPOSALS:
            self._proposals.append((proposed, snapshot.xmax, now))
        while self._proposals and (self._proposals[0][1] <= snapshot.xmin
                                   or now - self._proposals[0][2] >= FLOOR_WAIT_CAP):
            self.value = max(self.value, self._proposals.popleft()[0])


class Sweeps:
    """When the due path claims next: at once at start; back to back while its claims come back full (due rows
    are waiting: they go out at the rate limit, like fresh ones); else an interval after it found less; and
    after a failure, a backoff that doubles (the fresh path goes on meanwhile)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._next_at = clock()
        self.interval = MIN_SWEEP_INTERVAL
        self.hot = False  # the last due claim was full: more rows are due
        self.failures = 0

    def due(self) -> bool:
        return self.hot or self._clock() >= self._next_at

    def swept(self, duration: float, full: bool) -> None:
        """A due claim just ended after `duration` seconds; `full`: it took all it asked for."""
        self.hot, self.failures = full, 0
        self.interval = max(MIN_SWEEP_INTERVAL, SWEEP_COST_FACTOR * duration)
        self._next_at = self._clock() + self.interval

    def failed(self) -> float:
        """A due claim failed: the next waits a backoff (0.5 s doubling, at most 30 s); returns it."""
        self.hot, self.failures = False, self.failures + 1
        backoff = min(MAX_PATH_BACKOFF, 0.25 * 2 ** min(self.failures, 8))
        self._next_at = self._clock() + backoff
        return backoff
