"""The wake-up on real parts: a busy worker keeps reading its notifications (a listener that is not read pins
PostgreSQL's notification queue for the whole cluster), a wake-up that races its commit is caught by quick
re-polls, and an idle worker costs the database next to nothing."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from tests.conftest import status_of, wait_until

FAST = ["--connect-timeout", "0.5", "--read-timeout", "5", "--inline-attempts", "1", "--poll-interval", "0.5"]


def _enqueue(engine, count: int) -> list[str]:
    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": f"u{i}"}}
                                            for i in range(count)])
        session.commit()
    return ids


def _queue_usage(engine) -> float:
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_notify('fp_outbox_test_nudge', '')"))  # lets the queue's tail move on
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_notification_queue_usage()")).scalar_one()


def test_a_busy_worker_keeps_reading_its_notifications(clean, db_url, sink, workers):
    worker = workers(db_url, sink.url, "--concurrency", "4", *FAST)
    assert wait_until(lambda: "wake-up by LISTEN" in worker.output(), 20), worker.output()
    sink.set_faults(latency=0.3)
    _enqueue(clean, 150)  # 4 at a time, 0.3 s each: busy for about 11 s
    assert wait_until(lambda: status_of(clean).get("in_flight", 0) > 0, 10)
    with clean.begin() as conn:  # 20 MB of notifications: far more than the socket buffers hold
        conn.execute(text("SELECT pg_notify('fp_outbox', repeat('x', 1000) || i) FROM generate_series(1, 20000) i"))
    assert _queue_usage(clean) > 0
    assert wait_until(lambda: _queue_usage(clean) == 0, 8, interval=0.2), "the busy worker pins the queue"
    assert status_of(clean).get("pending", 0) > 0  # and it was busy all along: the backlog is not done
