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

The sweep claims by due time from the partial index: retries that became due, expired leases, released
rows, claims that rolled back, and the rare row the xid rule misses (its id taken before its xid). It runs
at start and then at least every interval, max(1 s, 50 x its own last duration): under a held horizon it
gets slower and so runs less often, costing at most ~2 % of the time. A retry, a released row or an expired
lease waits at most one interval longer than its due time.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

MIN_SWEEP_INTERVAL = 1.0  # seconds: the longest a due retry or an expired lease waits for the sweep ...
SWEEP_COST_FACTOR = 50.0  # ... unless the sweep is slow: then 50x its duration, so it stays ~2 % of the time
MAX_PROPOSALS = 8  # proposals kept while xmin is held back; beyond that a new one waits for a free place
FLOOR_WAIT_CAP = 1.0  # seconds a proposal waits for xmin: longer-lived transactions' late rows go to the sweep


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
    """When the next sweep is due: at once at start, then an interval after each sweep ends."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._next_at = clock()
        self.interval = MIN_SWEEP_INTERVAL

    def due(self) -> bool:
        return self._clock() >= self._next_at

    def swept(self, duration: float) -> None:
        """A sweep just ended after `duration` seconds: the next one comes an interval from now."""
        self.interval = max(MIN_SWEEP_INTERVAL, SWEEP_COST_FACTOR * duration)
        self._next_at = self._clock() + self.interval
