"""The floor's rule and the sweep's clock, pure: the floor passes an id only once no transaction that could
still commit a row with that id is running (a later snapshot's xmin reached the proposing snapshot's xmax);
the sweep runs at start and then every max(1 s, 50 x its own duration)."""

from __future__ import annotations

import pytest

from worker.engine.floor import FLOOR_WAIT_CAP, MAX_PROPOSALS, MIN_SWEEP_INTERVAL, Floor, Snapshot, Sweeps


def test_a_claim_that_was_not_full_proposes_the_visible_head():
    floor = Floor(10)
    floor.observe([11, 12], limit=25, snapshot=Snapshot(xmin=500, xmax=505, head=40))
    assert floor.value == 10  # transactions 500..504 may still commit ids <= 40
    floor.observe([], limit=25, snapshot=Snapshot(xmin=504, xmax=510, head=41))
    assert floor.value == 10
    floor.observe([], limit=25, snapshot=Snapshot(xmin=505, xmax=512, head=41))
    assert floor.value == 40  # every transaction below 505 has ended: nothing can appear at or below 40


def test_a_full_claim_proposes_its_highest_id_not_the_head():
    floor = Floor(0)
    floor.observe([1, 2, 3], limit=3, snapshot=Snapshot(xmin=7, xmax=7, head=900))
    assert floor.value == 3  # more may be due above 3; nobody was running, so it moves at once


def test_nothing_running_moves_the_floor_at_once():
    floor = Floor(0)
    floor.observe([], limit=25, snapshot=Snapshot(xmin=99, xmax=99, head=12))
    assert floor.value == 12


def test_an_empty_table_proposes_nothing():
    floor = Floor(0)
    floor.observe([], limit=25, snapshot=Snapshot(xmin=1, xmax=1, head=None))
    assert floor.value == 0


def test_the_floor_never_moves_back():
    floor = Floor(50)
    floor.observe([], limit=25, snapshot=Snapshot(xmin=9, xmax=9, head=30))  # a head below: rows deleted
    assert floor.value == 50


def test_a_long_write_transaction_holds_the_floor_back_for_the_wait_cap_only():
    now = [0.0]
    floor = Floor(0, clock=lambda: now[0])
    for step in range(1, 100):  # xid 1 runs throughout; the head keeps growing
        floor.observe([], limit=25, snapshot=Snapshot(xmin=1, xmax=1 + step, head=step * 10))
        assert len(floor._proposals) <= MAX_PROPOSALS
        now[0] += 0.001
    assert floor.value == 0  # within the cap it waits for xid 1 (its rows would come up late otherwise)
    now[0] += FLOOR_WAIT_CAP
    floor.observe([], limit=25, snapshot=Snapshot(xmin=1, xmax=101, head=1000))
    assert floor.value >= 10  # the cap passed: the proposals are taken although xid 1 still runs
    for _ in range(MAX_PROPOSALS + 1):  # each cap's wait takes the next proposal, then the head
        now[0] += FLOOR_WAIT_CAP
        floor.observe([], limit=25, snapshot=Snapshot(xmin=1, xmax=101, head=1000))
    assert floor.value == 1000


def test_the_floor_catches_up_at_once_when_the_long_transaction_ends():
    now = [0.0]
    floor = Floor(0, clock=lambda: now[0])
    for step in range(1, 20):
        floor.observe([], limit=25, snapshot=Snapshot(xmin=1, xmax=1 + step, head=step * 10))
    floor.observe([], limit=25, snapshot=Snapshot(xmin=1000, xmax=1000, head=1000))
    assert floor.value >= 80  # every proposal kept is safe now: no need to wait out the cap


@pytest.mark.parametrize("duration, interval", [(0.001, MIN_SWEEP_INTERVAL), (0.02, MIN_SWEEP_INTERVAL),
                                                (0.1, 5.0), (0.4, 20.0)])
def test_the_sweep_interval_follows_its_cost(duration, interval):
    now = [100.0]
    sweeps = Sweeps(clock=lambda: now[0])
    assert sweeps.due()  # at start
    sweeps.swept(duration, full=False)
    assert sweeps.interval == pytest.approx(interval)
    now[0] += interval - 0.01
    assert not sweeps.due()
    now[0] += 0.02
    assert sweeps.due()
