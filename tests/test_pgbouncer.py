"""Through a real PgBouncer 1.18 in transaction pooling mode, with no setting made for fp-outbox: an
application enqueueing (committing and rolling back) while two workers deliver, a drain, SIGTERM with work
in flight, the global rate limit, and the wake-up falling back to polling, saying so once."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

import outbox
from tests import pgbouncer
from tests.conftest import status_of, url_string, wait_until
from tests.test_rate_limit import _join, _workers, assert_the_limit_held

FAST = ["--connect-timeout", "0.5", "--read-timeout", "2", "--inline-attempts", "2", "--retry-base", "0.2",
        "--retry-cap", "1", "--poll-interval", "0.2"]


@pytest.fixture(scope="module")
def bounced_url(server_url: URL, db_url: URL) -> Iterator[URL]:
    """This module's database, reached through PgBouncer."""
    with pgbouncer.running(server_url) as bouncer:
        yield bouncer.set(database=db_url.database)


@pytest.fixture(scope="module")
def app_engine(bounced_url: URL) -> Iterator[Engine]:
    """What an application behind PgBouncer does on its own engine: no server-side prepared statements."""
    engine = create_engine(bounced_url, connect_args={"prepare_threshold": None})
    yield engine
    engine.dispose()


def _enqueue(engine: Engine, count: int, *, commit: bool = True, name: str = "Purchase") -> list[str]:
    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [{"event": name, "properties": {"distinct_id": f"u{i}", "n": i}}
                                            for i in range(count)])
        session.commit() if commit else session.rollback()
    return ids


def test_an_application_commits_and_rolls_back_while_two_workers_deliver(clean, bounced_url, app_engine, sink,
                                                                       workers):
    procs = [workers(bounced_url, sink.url, *FAST) for _ in range(2)]
    # Both have probed LISTEN (1 s through PgBouncer) before the first event: else one may be stopped, the events all
    # delivered by the other, before its probe has said how it is woken.
    assert wait_until(lambda: all("wake-up by" in p.output() for p in procs), 30), [p.output() for p in procs]
    committed, rolled_back = [], []
    for turn in range(60):  # one transaction at a time, as requests would: one in five rolls back
        ids = _enqueue(app_engine, 5, commit=turn % 5 != 4, name="Purchase" if turn % 5 != 4 else "RolledBack")
        (committed if turn % 5 != 4 else rolled_back).extend(ids)
        time.sleep(0.01)
    with psycopg.connect(url_string(bounced_url).replace("+psycopg", ""), prepare_threshold=None) as conn:
        committed.append(outbox.enqueue(conn, {"event": "Purchase", "properties": {"distinct_id": "p"}}))
        conn.commit()
    assert wait_until(lambda: len({r.insert_id for r in sink.accepted()}) >= len(committed), 60), \
        [p.output() for p in procs]
    for proc in procs:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output()
    assert {r.insert_id for r in sink.accepted()} == set(committed)
    assert not {r.insert_id for r in sink.received()} & set(rolled_back)
    assert status_of(clean) == {"delivered": len(committed)}
    for proc in procs:  # LISTEN cannot work through transaction pooling: each worker says once that it polls
        out = proc.output()
        assert out.count("wake-up by polling") == 1 and "wake-up by LISTEN" not in out, out
        assert "Traceback" not in out and "prepared statement" not in out, out


def test_a_drain_through_pgbouncer(clean, bounced_url, app_engine, sink, workers):
    committed = _enqueue(app_engine, 400)
    worker = workers(bounced_url, sink.url, "--drain", "--concurrency", "8", *FAST)
    assert worker.wait(90) == 0, worker.output()
    assert sorted(r.insert_id for r in sink.accepted()) == sorted(committed)
    assert status_of(clean) == {"delivered": 400}


def test_sigterm_with_work_in_flight_through_pgbouncer(clean, bounced_url, app_engine, sink, workers):
    _enqueue(app_engine, 40)
    sink.set_faults(latency=0.5)
    worker = workers(bounced_url, sink.url, "--concurrency", "4", *FAST)
    assert wait_until(lambda: len(sink.received()) >= 4, 30), worker.output()
    assert status_of(clean).get("in_flight", 0) > 0  # the signal lands with work in flight
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()
    counts = status_of(clean)
    assert counts.get("in_flight", 0) == 0
    assert counts["delivered"] == len({r.insert_id for r in sink.accepted()})
    assert counts["delivered"] + counts.get("pending", 0) == 40


def test_the_global_rate_limit_through_pgbouncer(clean, bounced_url, app_engine, sink):
    """The limiter's schedule holds through transaction pooling (its advisory lock is transaction-scoped). As in
    tests/test_rate_limit.py, what is checked is what the limiter guarantees: the slices it granted, and
    that each request arrived after its slice began (arrival times alone would measure the host's scheduler)."""
    limit = 100
    committed = _enqueue(app_engine, 400)
    running = _workers(bounced_url, sink, 2, "--drain", "--rate-limit", str(limit))
    _join(running, 120)
    assert_the_limit_held(running, sink, committed, limit)


def test_migrate_works_through_pgbouncer(server_url, bounced_url, capsys):
    """The whole upgrade is one transaction on one connection: transaction pooling serves it like a direct
    connection, from an empty database and again at head."""
    from tests.conftest import create_database, drop_database
    from worker.admin import main as admin_main

    fresh = create_database(server_url)
    try:
        url = url_string(bounced_url.set(database=fresh.database))
        assert admin_main(["migrate", "--database-url", url]) == 0, capsys.readouterr().err
        assert admin_main(["migrate", "--database-url", url]) == 0, capsys.readouterr().err
        assert admin_main(["status", "--json", "--database-url", url]) == 0, capsys.readouterr().err
        assert '"pending": 0' in capsys.readouterr().out
    finally:
        drop_database(server_url, fresh)
