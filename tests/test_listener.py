"""The wake-up on real parts: a busy worker keeps reading its notifications (a listener that is not read pins
PostgreSQL's notification queue for the whole cluster), a wake-up that races its commit is caught by quick
re-polls, and an idle worker costs the database next to nothing."""

from __future__ import annotations

import time

from sqlalchemy import text

from tests.conftest import enqueue_events, status_of, wait_until

FAST = ["--connect-timeout", "0.5", "--read-timeout", "5", "--inline-attempts", "1", "--poll-interval", "0.5"]


def _queue_usage(engine) -> float:
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_notify('fp_outbox_test_nudge', '')"))  # lets the queue's tail move on
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_notification_queue_usage()")).scalar_one()


def test_a_busy_worker_keeps_reading_its_notifications(clean, db_url, sink, workers):
    worker = workers(db_url, sink.url, "--concurrency", "4", *FAST)
    assert wait_until(lambda: "wake-up by LISTEN" in worker.output(), 20), worker.output()
    sink.set_faults(latency=0.3)
    enqueue_events(clean, 150)  # 4 at a time, 0.3 s each: busy for about 11 s
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


def _listener(engine):
    from worker.engine.listener import Listener
    from worker.engine.notify import Notifier
    from worker.engine.services import StopSignal

    return Listener(engine, StopSignal(Notifier({})))


def _listening_backends(engine) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND query = 'LISTEN fp_outbox'")).scalars().all()


def _woken_within(listener, engine, seconds: float) -> bool:
    time.sleep(0.1)  # past the quick re-polls a previous wake-up scheduled
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_notify('fp_outbox', '')"))
    started = time.monotonic()
    listener.wait(2 * seconds)
    return time.monotonic() - started < seconds


def test_a_lost_listening_connection_is_opened_and_proved_again(engine, monkeypatch):
    from worker.engine import listener as listener_module

    monkeypatch.setattr(listener_module, "RETRY_CONNECT_AFTER", 0.2)
    listener = _listener(engine)
    try:
        listener.wait(0.001)
        [before] = _listening_backends(engine)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": before})
        assert wait_until(lambda: _listening_backends(engine) == [], 5)
        listener.wait(0.3)  # the read fails: polling meanwhile, no exception
        time.sleep(0.3)
        listener.wait(0.01)  # reconnects and probes again
        assert [pid for pid in _listening_backends(engine) if pid != before]
        assert _woken_within(listener, engine, 1.0)
    finally:
        listener.close()


def test_a_listening_connection_gone_silent_is_found_by_the_next_probe(db_url, server_url, monkeypatch):
    """A link that swallows everything: reads just time out, so only the periodic probe can tell."""
    from sqlalchemy.pool import NullPool

    from outbox.db import make_engine
    from tests.test_timeouts import proxy_to
    from worker.engine import listener as listener_module

    monkeypatch.setattr(listener_module, "REPROBE_EVERY", 0.5)
    monkeypatch.setattr(listener_module, "RETRY_CONNECT_AFTER", 0.2)
    proxy = proxy_to(server_url)
    proxied = make_engine(db_url.set(host="127.0.0.1", port=proxy.port, query={}), poolclass=NullPool)
    listener = _listener(proxied)
    try:
        listener.wait(0.001)
        assert _woken_within(listener, proxied, 1.0)
        proxy.swallow()  # the listening connection goes silent; new connections still work
        assert not _woken_within(listener, proxied, 1.0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _woken_within(listener, proxied, 1.0):
            listener.wait(0.2)  # the probe goes unanswered, the connection is dropped and opened anew
        assert _woken_within(listener, proxied, 1.0)
    finally:
        listener.close()
        proxied.dispose()
        proxy.close()
