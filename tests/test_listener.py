"""The wake-up on real parts: a busy worker keeps reading its notifications (a listener that is not read pins
PostgreSQL's notification queue for the whole cluster), a wake-up that races its commit is caught by quick
re-polls, and an idle worker costs the database next to nothing."""

from __future__ import annotations

import time

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


def test_after_a_wake_up_that_found_nothing_it_polls_again_within_100_ms(engine):
    """A wake-up can come before the commit it announces (SQLAlchemy Connection's hook fires before the
    commit): after one, the next three waits return at once-ish (+10, +30, +70 ms) before polling slowly."""
    from worker.engine.listener import Listener
    from worker.engine.notify import Notifier
    from worker.engine.services import StopSignal

    listener = Listener(engine, StopSignal(Notifier({})))
    try:
        listener.wait(0.001)  # connects and proves LISTEN
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_notify('fp_outbox', '')"))
        waits = []
        for _ in range(5):
            started = time.monotonic()
            listener.wait(2.0)
            waits.append(time.monotonic() - started)
    finally:
        listener.close()
    assert waits[0] < 1.0  # woken by the notification
    assert all(wait < 0.5 for wait in waits[1:4]), waits  # the three quick re-polls, 70 ms in all
    assert waits[4] >= 1.9, waits  # then the poll interval again


def test_an_idle_worker_costs_the_database_at_most_a_few_transactions_a_second(clean, db_url, sink, workers):
    worker = workers(db_url, sink.url, "--retain-delivered", "1h")  # default poll interval (1 s)
    assert wait_until(lambda: "wake-up by LISTEN" in worker.output(), 20), worker.output()
    time.sleep(2)  # past the start-up
    before, started = _transactions(clean, db_url.database), time.monotonic()
    time.sleep(10)
    rate = (_transactions(clean, db_url.database) - before) / (time.monotonic() - started)
    # Each of the worker's transactions is at most BEGIN, SET LOCAL, one statement and COMMIT: 5 a
    # second is 20 statements a second. A worker that spins runs hundreds.
    assert rate <= 5, f"{rate:.1f} transactions/s while nothing is due"
    assert worker.proc.poll() is None, worker.output()


def _transactions(engine, database: str) -> int:
    time.sleep(1.2)  # backends report their counts at most once a second: let the last ones land
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        return conn.execute(text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :db"),
                            {"db": database}).scalar_one()
