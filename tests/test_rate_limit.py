"""The global rate limit, counted where it matters: at the receiver, across several worker processes."""

from __future__ import annotations


from sqlalchemy.orm import Session

import outbox
from tests.conftest import status_of, wait_until

FAST = ["--connect-timeout", "0.5", "--read-timeout", "2", "--poll-interval", "0.2", "--concurrency", "16"]


def _enqueue(engine, count: int) -> list[str]:
    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": f"u{i}"}} for i in range(count)])
        session.commit()
    return ids


def _busiest_second(times: list[float]) -> int:
    """The most requests in any one-second window (sliding, not aligned)."""
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_four_workers_together_stay_under_the_limit(clean, db_url, sink, workers):
    limit = 300
    committed = _enqueue(clean, 1800)
    procs = [workers(db_url, sink.url, "--drain", "--rate-limit", str(limit), *FAST) for _ in range(4)]
    for proc in procs:
        assert proc.wait(120) == 0, proc.output()
    arrivals = [r.arrived_at for r in sink.received()]
    assert {r.insert_id for r in sink.accepted()} == set(committed)
    assert _busiest_second(arrivals) <= limit
    span = max(arrivals) - min(arrivals)
    assert span >= len(arrivals) / limit - 1  # it really was throttled: the backlog took its time


def test_a_429_pauses_every_worker_for_its_retry_after(clean, db_url, sink, workers):
    _enqueue(clean, 600)
    procs = [workers(db_url, sink.url, "--drain", "--rate-limit", "100", *FAST) for _ in range(2)]
    assert wait_until(lambda: len(sink.received()) >= 20, 30)
    sink.answer_next(429, retry_after="2")
    assert wait_until(lambda: any(r.status == 429 for r in sink.received()), 30)
    [rate_limited] = [r.arrived_at for r in sink.received() if r.status == 429]
    assert wait_until(lambda: max(r.arrived_at for r in sink.received()) > rate_limited + 2.0, 30)
    during = [r for r in sink.received() if rate_limited + 0.3 < r.arrived_at < rate_limited + 1.95]
    assert during == []  # neither worker sent anything while the pause lasted
    for proc in procs:
        assert proc.wait(120) == 0, proc.output()
    assert status_of(clean) == {"delivered": 600}
