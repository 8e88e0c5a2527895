"""The due path's pace, pure: it runs at start; back to back while its claims come back full (due events wait);
otherwise every max(1 s, 50 x its own duration); after a failure, a backoff that doubles (0.5 s up to 30 s)."""

from __future__ import annotations

import pytest

from worker.engine.paths import MAX_PATH_BACKOFF, MIN_SWEEP_INTERVAL, DuePath, FreshPath


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("duration, interval", [(0.001, 1.0), (0.02, 1.0), (0.1, 5.0), (0.4, 20.0)])
def test_the_due_paths_interval_follows_its_cost(duration, interval):
    clock = Clock()
    due = DuePath(store=None, clock=clock)
    assert due.ready()  # at start
    due.swept(duration, full=False)
    assert due.interval == pytest.approx(max(MIN_SWEEP_INTERVAL, interval))
    clock.now += due.interval - 0.001
    assert not due.ready()
    clock.now += 0.002
    assert due.ready()


def test_while_its_claims_come_back_full_the_due_path_claims_again_at_once():
    clock = Clock()
    due = DuePath(store=None, clock=clock)
    due.swept(0.3, full=True)
    assert due.ready()  # no interval while due events wait: they go at the rate limit
    due.swept(0.3, full=False)
    assert not due.ready()


@pytest.mark.parametrize("path_class", [DuePath, FreshPath])
def test_a_failing_path_backs_off_doubling_up_to_its_cap(path_class):
    clock = Clock()
    path = path_class(store=None, clock=clock)
    waits = []
    for _ in range(12):
        waits.append(path.failed())
        assert not path.ready()
        clock.now += waits[-1]
        assert path.ready()
    assert waits[:4] == [0.5, 1.0, 2.0, 4.0] and waits[-1] == MAX_PATH_BACKOFF
