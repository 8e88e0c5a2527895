"""Waking the workers after commit, outside the caller's transaction: no NOTIFY inside it, a commit wakes an
idle real worker at once, a rollback wakes nobody, and a burst of commits costs a few notifications."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox import wake
from outbox.db import make_engine
from outbox.statements import INSERT_MANY, INSERT_ONE
from tests.conftest import url_string, wait_until


def purchase(distinct_id: str = "13793", **properties) -> dict:
    return {"event": "Purchase", "properties": {"distinct_id": distinct_id, **properties}}


def conninfo(url) -> str:
    return url_string(url.set(drivername="postgresql"))


def set_idle_flag(url, seconds: float | None) -> None:
    """Say, as an idle worker does, that a listener waits for `seconds` from now; None: nobody idles (the flag down,
    as the owner may set it)."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        if seconds is None:
            conn.execute("SELECT setval('fp_outbox_listening_seq', 0)")
        else:
            conn.execute("SELECT fp_outbox_listening(%s)", (seconds,))


class Listener:
    """A real LISTEN connection on the outbox channel, timing each notification as it arrives; unless told
    otherwise it says it idles (fp_outbox_listening) as a worker does before it waits, until it closes."""

    def __init__(self, url, idle: bool = True) -> None:
        self.arrivals: list[float] = []
        self.payloads: list[str] = []
        self._url, self._idle = url, idle
        self._conn = psycopg.connect(conninfo(url), autocommit=True)
        self._conn.execute(f"LISTEN {wake.NOTIFY_CHANNEL}")
        set_idle_flag(url, 3600 if idle else None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for note in self._conn.notifies(timeout=0.05):
                self.payloads.append(note.payload)
                self.arrivals.append(time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()
        if self._idle:
            set_idle_flag(self._url, None)


@pytest.fixture
def listener(db_url) -> Iterator[Listener]:
    listening = Listener(db_url)
    yield listening
    listening.close()


@pytest.fixture
def fresh_engine(db_url, clean):
    """An engine of this test's own, so its waker starts with no history."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def received(sink, insert_id: str) -> bool:
    return any(r.insert_id == insert_id for r in sink.accepted())


# ---------------------------------------------------------------- nothing inside the transaction

def test_the_statements_hold_no_notify():
    for statement in (INSERT_ONE, INSERT_MANY):
        assert "notify" not in statement.psycopg.lower()
        assert "notify" not in statement.sqlalchemy.text.lower()


@contextlib.contextmanager
def statements_by_connection(sync_engine) -> Iterator[list[tuple[bool, str]]]:
    """Every statement, with whether it ran in autocommit mode (outside any transaction)."""
    seen: list[tuple[bool, str]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append((conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT", statement))

    sa_event.listen(sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa_event.remove(sync_engine, "before_cursor_execute", record)


def _business_and_wake_statements(seen) -> tuple[list[str], list[str]]:
    return [s for autocommit, s in seen if not autocommit], [s for autocommit, s in seen if autocommit]


def test_the_business_transaction_runs_no_notify_and_the_wake_up_comes_on_another_connection(fresh_engine):
    with statements_by_connection(fresh_engine) as seen:
        with Session(fresh_engine) as session:
            session.execute(text("SELECT 1"))
            outbox.enqueue(session, purchase())
            outbox.enqueue_many(session, [purchase(), purchase()])
            outbox.identify(session, "u-1", {"plan": "pro"})
            session.commit()
        with fresh_engine.connect() as conn:
            outbox.enqueue(conn, purchase())
            conn.commit()
        assert wait_until(lambda: len(_business_and_wake_statements(seen)[1]) >= 1, 5)
    inside, outside = _business_and_wake_statements(seen)
    assert len([s for s in inside if s.startswith("INSERT INTO fp_outbox_events")]) == 4
    assert not [s for s in inside if "notify" in s.lower()]
    assert set(outside) == {wake.WAKE_SQL}


def test_asyncio_handles_run_no_notify_inside_the_transaction(db_url, clean):
    async def scenario() -> tuple[list[str], list[str]]:
        engine = create_async_engine(db_url)
        try:
            with statements_by_connection(engine.sync_engine) as seen:
                async with AsyncSession(engine) as session, session.begin():
                    await outbox.enqueue_async(session, purchase())
                    await outbox.enqueue_many_async(session, [purchase()])
                async with engine.begin() as conn:
                    await outbox.identify_async(conn, "u-1", {"plan": "pro"})
                deadline = time.monotonic() + 5
                while not _business_and_wake_statements(seen)[1] and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)  # the wake-up is a task on this loop
            return _business_and_wake_statements(seen)
        finally:
            await engine.dispose()

    inside, outside = asyncio.run(scenario())
    assert len([s for s in inside if s.startswith("INSERT INTO fp_outbox_events")]) == 3
    assert not [s for s in inside if "notify" in s.lower()]
    assert set(outside) == {wake.WAKE_SQL}


# ---------------------------------------------------------------- a commit wakes an idle worker

def _worker_is_listening(engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = :q"),
            {"q": f"LISTEN {wake.NOTIFY_CHANNEL}"}).scalar())


async def _commit_async_and_wait(db_url, sink, timeout: float) -> tuple[str, bool]:
    engine = create_async_engine(db_url)
    try:
        async with AsyncSession(engine) as session, session.begin():
            insert_id = await outbox.enqueue_async(session, purchase(via="AsyncSession"))
        deadline = time.monotonic() + timeout
        while not received(sink, insert_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the loop keeps running, as in an application
        return insert_id, received(sink, insert_id)
    finally:
        await engine.dispose()


def test_a_commit_wakes_an_idle_worker_long_before_its_next_poll(fresh_engine, db_url, sink, workers):
    # The worker polls every 30 s; only a wake-up can bring an event within seconds, and the applications wake only
    # when a worker has said it idles.
    set_idle_flag(db_url, None)
    worker = workers(db_url, sink.url, "--poll-interval", "30")
    assert wait_until(lambda: _worker_is_listening(fresh_engine), 30), worker.output()
    with Session(fresh_engine) as session:
        insert_id = outbox.enqueue(session, purchase(via="Session"))
        session.commit()
    assert wait_until(lambda: received(sink, insert_id), 5), worker.output()
    insert_id, arrived = asyncio.run(_commit_async_and_wait(db_url, sink, 5))
    assert arrived, worker.output()


def test_no_notification_is_sent_while_no_worker_idles(fresh_engine, db_url):
    """Busy workers claim again on their own: a wake-up then is a NOTIFY nobody needs (a transaction with its own
    commit and flush, and a signal to every listener; 0.064 of the commit rate at 32 connections). The application's
    wake-up notifies only while a worker has said it idles, up to the moment it said."""
    set_idle_flag(db_url, None)
    listener = Listener(db_url, idle=False)  # listening, as a busy worker's connection does, but not idle
    try:
        waker_sends = []
        sa_event.listen(fresh_engine, "before_cursor_execute",
                        lambda conn, cursor, statement, *args: waker_sends.append(statement)
                        if statement == wake.WAKE_SQL else None)
        with Session(fresh_engine) as session:
            outbox.enqueue(session, purchase())
            session.commit()
        assert wait_until(lambda: waker_sends, 5)  # the waker did its part
        time.sleep(0.3)
        assert listener.payloads == []
        set_idle_flag(db_url, 1.0)  # a worker idles for the next second
        time.sleep(wake.WAKE_INTERVAL)
        with Session(fresh_engine) as session:
            outbox.enqueue(session, purchase())
            session.commit()
        assert wait_until(lambda: listener.payloads, 5)
        time.sleep(1.0)  # the moment it said has passed: nobody idles any more
        count = len(listener.payloads)
        with Session(fresh_engine) as session:
            outbox.enqueue(session, purchase())
            session.commit()
        assert wait_until(lambda: len(waker_sends) == 3, 5)
        time.sleep(0.3)
        assert len(listener.payloads) == count
    finally:
        listener.close()


def test_a_rollback_wakes_nobody(fresh_engine, listener, db_url):
    """Whatever the load: each handle rolls back what it enqueued and then commits again without enqueueing (a
    mark left behind would wake the workers then); no waker is ever made for the engine, and a sentinel NOTIFY
    sent afterwards is the first and only notification (everything sent before it has arrived with it)."""
    with Session(fresh_engine) as session:
        outbox.enqueue(session, purchase())
        session.rollback()
        session.execute(text("SELECT 1"))
        session.commit()
    with fresh_engine.connect() as conn:
        outbox.enqueue(conn, purchase())
        conn.rollback()
        conn.execute(text("SELECT 1"))
        conn.commit()
    with contextlib.suppress(RuntimeError), Session(fresh_engine) as session, session.begin():
        outbox.enqueue(session, purchase())
        raise RuntimeError("the business code failed")
    with Session(fresh_engine) as session:
        outbox.enqueue(session, purchase())  # closed without commit
    with Session(fresh_engine) as session:
        session.execute(text("SELECT 1"))
        session.commit()  # a later commit on a session that never enqueued in its transaction
    assert fresh_engine not in wake._wakers  # nothing ever asked for a wake-up
    with psycopg.connect(conninfo(db_url), autocommit=True) as other:
        other.execute(f"SELECT pg_notify('{wake.NOTIFY_CHANNEL}', 'sentinel')")
    assert wait_until(lambda: listener.payloads, 10)
    assert listener.payloads == ["sentinel"]


@pytest.fixture
def slow_commits(clean):
    """A commit that inserted an event named SlowCommit takes half a second more (a deferred trigger that
    sleeps at commit time), as on a loaded server or a synchronous standby far away."""
    with clean.begin() as conn:
        conn.execute(text("""
            CREATE FUNCTION fp_test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$"""))
        conn.execute(text("""
            CREATE CONSTRAINT TRIGGER fp_test_slow_commit AFTER INSERT ON fp_outbox_events
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
            WHEN (NEW.event_name = 'SlowCommit') EXECUTE FUNCTION fp_test_slow_commit()"""))
    yield
    with clean.begin() as conn:
        conn.execute(text("DROP TRIGGER fp_test_slow_commit ON fp_outbox_events"))
        conn.execute(text("DROP FUNCTION fp_test_slow_commit()"))


def test_no_wake_up_reaches_a_listener_before_the_commit_returns(fresh_engine, listener, slow_commits):
    """A Session's wake-up goes after its commit: with the commit taking half a second, a wake-up sent at its
    start would be heard long before it returns."""
    with Session(fresh_engine) as session:
        outbox.enqueue(session, {"event": "SlowCommit", "properties": {"distinct_id": "u"}})
        started = time.monotonic()
        session.commit()
        committed = time.monotonic()
    assert committed - started >= 0.5  # the commit really was slow
    assert wait_until(lambda: listener.arrivals, 5)
    assert min(listener.arrivals) >= committed, f"heard {committed - min(listener.arrivals):.2f} s before the commit"


def test_one_failed_thread_start_does_not_stop_wake_ups_for_good(fresh_engine, listener, monkeypatch):
    """The waker's thread cannot start once (a thread limit, memory pressure): that wake-up is lost (the workers
    poll), the commit is untouched, and the next commit wakes the workers again."""
    real_start, failures = threading.Thread.start, [RuntimeError("can't start new thread")]

    def start_or_fail(thread: threading.Thread) -> None:
        if thread.name == "fp-outbox-waker" and failures:
            raise failures.pop()
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_fail)
    for _ in range(2):
        with Session(fresh_engine) as session:
            outbox.enqueue(session, purchase())
            session.commit()
    assert not failures  # the first commit met the failure
    assert wait_until(lambda: listener.arrivals, 5), "the second commit woke nobody"


# ---------------------------------------------------------------- debounced

def test_a_burst_of_commits_costs_few_notifications_and_the_last_one_follows_the_last_commit(
        fresh_engine, listener):
    commits = 500
    started = time.monotonic()
    with Session(fresh_engine) as session:
        for n in range(commits):
            outbox.enqueue(session, purchase(n=n))
            session.commit()
    last_commit = time.monotonic()
    assert wait_until(lambda: listener.arrivals and listener.arrivals[-1] >= last_commit, 5)
    time.sleep(4 * wake.WAKE_INTERVAL)  # a trailing notification would be in by now
    elapsed = last_commit - started
    print(f"{commits} commits in {elapsed:.2f} s: {len(listener.arrivals)} notifications")
    # at most one per WAKE_INTERVAL while the burst lasted, plus the leading and the trailing one
    assert len(listener.arrivals) <= elapsed / wake.WAKE_INTERVAL + 2
    assert len(listener.arrivals) < commits / 4


def _wake_ups_sent(engine) -> list[float]:
    """When each of `engine`'s wake-ups was sent (time.monotonic()), from now on."""
    sent: list[float] = []
    sa_event.listen(engine, "before_cursor_execute", lambda conn, cursor, statement, *args: sent.append(
        time.monotonic()) if statement == wake.WAKE_SQL else None)
    return sent


def test_while_every_worker_is_busy_a_process_checks_a_few_times_a_second_not_forty(fresh_engine, db_url):
    """Through a busy spell (an outage's backlog: no worker says it idles) a wake-up finds nobody to wake. Once one
    says so (fp_outbox_wake_if_idle() returns false), the next comes BUSY_WAKE_INTERVAL later, not WAKE_INTERVAL:
    about 4 a second from each process instead of 40, each a round trip and a call on the application's server."""
    set_idle_flag(db_url, None)
    sent = _wake_ups_sent(fresh_engine)
    started = time.monotonic()
    commits = 0
    with Session(fresh_engine) as session:
        while time.monotonic() - started < 1.5:
            outbox.enqueue(session, purchase(n=commits))
            session.commit()
            commits += 1
            time.sleep(0.002)
    elapsed = time.monotonic() - started
    time.sleep(wake.BUSY_WAKE_INTERVAL + 0.2)  # the trailing one is in
    print(f"{commits} commits in {elapsed:.2f} s: {len(sent)} wake-ups")
    assert commits > 100, "the commits came too slowly to test the debounce"
    assert 2 <= len(sent) <= elapsed / wake.BUSY_WAKE_INTERVAL + 2, sent
    # spaced by the interval (less the first send's wait for a new pooled connection, which the next one reuses)
    assert min(b - a for a, b in itertools.pairwise(sent)) >= wake.BUSY_WAKE_INTERVAL / 2, sent


def test_a_commit_during_a_busy_spell_still_wakes_a_worker_that_went_idle_meanwhile(fresh_engine, db_url):
    """The wake-ups are spaced out while every worker is busy, never dropped: a worker that says it idles just after
    a wake-up found it busy is woken for the next commit within BUSY_WAKE_INTERVAL, not at its next poll."""
    set_idle_flag(db_url, None)
    sent = _wake_ups_sent(fresh_engine)
    listener = Listener(db_url, idle=False)
    try:
        with Session(fresh_engine) as session:
            outbox.enqueue(session, purchase())
            session.commit()
        assert wait_until(lambda: sent, 5)
        time.sleep(0.05)  # that wake-up found every worker busy
        assert listener.payloads == []
        set_idle_flag(db_url, 3600)  # now a worker idles
        with Session(fresh_engine) as session:
            outbox.enqueue(session, purchase())
            session.commit()
        committed = time.monotonic()
        assert wait_until(lambda: listener.arrivals, 5), "the commit during the busy interval woke nobody"
        assert listener.arrivals[0] - committed <= wake.BUSY_WAKE_INTERVAL + 0.5
        assert len(sent) == 2
    finally:
        listener.close()
        set_idle_flag(db_url, None)


DEBOUNCE_STEPS = [
    # (action, moment, the next send expected after it)
    ("request", 0.000, 0.000),   # the first goes at once
    ("send", 0.000, None),
    ("request", 0.010, 0.025),   # within the interval: waits for its end
    ("request", 0.020, 0.025),   # folded into the same send
    ("send", 0.025, None),
    ("request", 0.100, 0.100),   # after a quiet spell: at once again
    ("request", 0.130, 0.100),   # a delayed request: its moment comes after the send below begins...
    ("send", 0.110, 0.135),      # ...so another send follows, an interval later
    ("send", 0.135, None),
]


def test_the_debounce_schedule():
    debounce = wake.Debounce(0.025)
    for action, moment, expected in DEBOUNCE_STEPS:
        if action == "request":
            debounce.request(moment)
        else:
            debounce.sending(moment)
        assert debounce.next_send() == (None if expected is None else pytest.approx(expected)), (action, moment)


# ---------------------------------------------------------------- after fork

def _commit_in_child(url, engine, result) -> None:
    engine.dispose(close=False)  # the parent's pooled connections are not this process's
    child_listener = Listener(url)
    try:
        with Session(engine) as session:
            outbox.enqueue(session, purchase(via="child"))
            session.commit()
        result.value = int(wait_until(lambda: child_listener.arrivals, 5))
    finally:
        child_listener.close()


def test_a_forked_child_gets_a_waker_of_its_own(fresh_engine, db_url, listener):
    with Session(fresh_engine) as session:  # the parent's waker and its thread exist before the fork
        outbox.enqueue(session, purchase())
        session.commit()
    assert wait_until(lambda: listener.arrivals, 5)
    context = multiprocessing.get_context("fork")
    result = context.Value("i", 0)
    child = context.Process(target=_commit_in_child, args=(db_url, fresh_engine, result))
    child.start()
    child.join(30)
    assert child.exitcode == 0 and result.value == 1


# ---------------------------------------------------------------- psycopg: the explicit wake-up

def test_wake_workers_on_a_psycopg_connection_after_commit(db_url, clean, listener):
    with psycopg.connect(conninfo(db_url)) as conn:
        outbox.enqueue(conn, purchase())
        with pytest.raises(ValueError, match="after commit"):
            outbox.wake_workers(conn)  # inside the transaction: refused, nothing sent
        conn.commit()
        outbox.wake_workers(conn)
        assert conn.autocommit is False  # restored
        assert wait_until(lambda: len(listener.arrivals) == 1, 5)
        with pytest.raises(TypeError, match="psycopg Connection"):
            outbox.wake_workers(Session())


def test_wake_workers_async_on_a_psycopg_async_connection(db_url, clean, listener):
    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(conninfo(db_url)) as conn:
            await outbox.enqueue_async(conn, purchase())
            await conn.commit()
            await outbox.wake_workers_async(conn)
            assert conn.autocommit is False

    asyncio.run(scenario())
    assert wait_until(lambda: len(listener.arrivals) == 1, 5)


@pytest.mark.parametrize("revision", ["0008", "0010"])
def test_before_the_schema_has_this_release_s_wake_function_the_wake_up_is_the_one_it_has(server_url, revision):
    """An application upgraded before `fp-outbox migrate`: at 0010 there is no fp_outbox_wake_if_idle() yet, so its
    wake-ups are 0009's fp_outbox_wake() (which notifies an idle worker all the same); before 0009 they are the plain
    NOTIFY; from every kind of handle, and they never fail the caller."""
    from alembic import command

    from outbox.db import alembic_config
    from tests.conftest import create_database, drop_database

    url = create_database(server_url)
    engine = make_engine(url)
    try:
        command.upgrade(alembic_config(url), revision)
        with psycopg.connect(conninfo(url), autocommit=True) as listening:
            listening.execute(f"LISTEN {wake.NOTIFY_CHANNEL}")
            if revision >= "0009":
                set_idle_flag(url, 3600)
            with Session(engine) as session:
                outbox.enqueue(session, purchase())
                session.commit()
            assert len(list(listening.notifies(timeout=5, stop_after=1))) == 1
            with psycopg.connect(conninfo(url)) as conn:
                outbox.enqueue(conn, purchase())
                conn.commit()
                outbox.wake_workers(conn)
                assert conn.execute("SELECT count(*) FROM fp_outbox_events").fetchone()[0] == 2  # still usable
            assert len(list(listening.notifies(timeout=5, stop_after=1))) == 1
    finally:
        engine.dispose()
        drop_database(server_url, url)


def test_on_a_schema_without_fp_outbox_wake_a_psycopg_connection_tries_it_once_a_minute_not_at_every_call(
        server_url, tmp_path):
    """wake_workers on a schema before 0009: the first call finds neither fp_outbox_wake_if_idle() nor
    fp_outbox_wake() and notifies plainly; the
    calls after it on that connection notify plainly at once, for RETRY_WAKE_FUNCTION_AFTER, instead of sending the
    failing statement first each time (an ERROR in the server's log and a round trip more per business
    transaction). Counted in what libpq received (its trace: the server's errors), the same for the async
    connection: one failure for each connection, not one at each of its calls."""
    from alembic import command

    from outbox.db import alembic_config
    from tests.conftest import create_database, drop_database

    url = create_database(server_url)
    try:
        command.upgrade(alembic_config(url), "0008")
        trace = tmp_path / "libpq.trace"
        with psycopg.connect(conninfo(url), autocommit=True) as listening, open(trace, "w") as traced:
            listening.execute(f"LISTEN {wake.NOTIFY_CHANNEL}")
            with psycopg.connect(conninfo(url)) as conn:
                conn.pgconn.trace(traced.fileno())
                for _ in range(3):
                    outbox.enqueue(conn, purchase())
                    conn.commit()
                    outbox.wake_workers(conn)
                conn.pgconn.untrace()
            assert len(list(listening.notifies(timeout=5, stop_after=3))) == 3  # every call woke the listeners

            async def calls() -> None:
                async with await psycopg.AsyncConnection.connect(conninfo(url)) as aconn:
                    aconn.pgconn.trace(traced.fileno())
                    for _ in range(3):
                        await outbox.wake_workers_async(aconn)
                    aconn.pgconn.untrace()

            asyncio.run(calls())
            assert len(list(listening.notifies(timeout=5, stop_after=3))) == 3
        failed = [line for line in trace.read_text().splitlines() if "ErrorResponse" in line]
        # each connection's first call: neither 0011's function nor 0009's, then never again
        assert len(failed) == 4, failed
        assert sum("fp_outbox_wake_if_idle() does not exist" in line for line in failed) == 2, failed
        assert sum("fp_outbox_wake() does not exist" in line for line in failed) == 2, failed
    finally:
        drop_database(server_url, url)


def _flag_ahead_s(engine) -> float:
    """How far ahead the moment some worker said it listens until lies, in seconds (negative: past)."""
    with engine.connect() as conn:
        return conn.execute(text("SELECT (last_value - extract(epoch FROM clock_timestamp()) * 1000) / 1000.0"
                                 " FROM fp_outbox_listening_seq")).scalar_one()


def test_an_idle_worker_says_it_listens_for_three_waits_and_again_before_that_runs_out(fresh_engine, db_url):
    """Said for three waits and two half-second margins ahead, then not again while more than a wait and a margin is
    left (the worker then just waits), and again when less is; each saying asks for one more claim. Two workers: the
    later moment stays (never lowered), so one going idle cannot silence another's wake-ups."""
    from worker.engine.idleflag import IdleFlag

    set_idle_flag(db_url, None)
    flag = IdleFlag(fresh_engine)
    assert flag.say(0.2) is True
    assert 1.4 < _flag_ahead_s(fresh_engine) <= 1.6  # three waits and two margins
    assert flag.say(0.2) is False  # 1.6 s ahead covers a wait and a margin: just wait
    assert flag.say(1.2) is True  # less than a wait of 1.2 s and a margin is left: said again
    assert 4.4 < _flag_ahead_s(fresh_engine) <= 4.6
    assert flag.say(1.0) is False
    IdleFlag(fresh_engine).say(0.1)  # another worker, idling with a shorter poll
    assert _flag_ahead_s(fresh_engine) > 4.0
    set_idle_flag(db_url, None)


class CountingConnection(psycopg.Connection):
    """A real psycopg connection that counts the wake-ups run on it."""

    wake_ups = 0

    def execute(self, query, *args, **kwargs):
        if query == wake.WAKE_SQL:
            self.wake_ups += 1
        return super().execute(query, *args, **kwargs)


def test_wake_workers_sends_nothing_for_a_quarter_second_after_a_call_found_every_worker_busy(db_url, clean):
    """psycopg's wake_workers has no thread to defer to: once a call on a connection found every worker busy, the
    calls on it for BUSY_WAKE_INTERVAL send nothing (a round trip saved per business transaction through a busy
    spell); once a worker idles, the next call after that interval wakes it."""
    set_idle_flag(db_url, None)
    with CountingConnection.connect(conninfo(db_url)) as conn:
        started, calls = time.monotonic(), 0
        while time.monotonic() - started < 0.6:
            outbox.enqueue(conn, purchase(n=calls))
            conn.commit()
            outbox.wake_workers(conn)
            calls += 1
        elapsed = time.monotonic() - started
        print(f"{calls} calls in {elapsed:.2f} s: {conn.wake_ups} sent")
        assert calls > 20, "the commits came too slowly to test the skipping"
        assert 1 <= conn.wake_ups <= elapsed / wake.BUSY_WAKE_INTERVAL + 1, (calls, conn.wake_ups)
        listener = Listener(db_url)  # a worker idles now
        try:
            time.sleep(wake.BUSY_WAKE_INTERVAL)
            outbox.wake_workers(conn)
            assert wait_until(lambda: listener.arrivals, 5)
        finally:
            listener.close()


def test_a_worker_that_says_it_idles_after_a_busy_spell_claims_again_a_quarter_second_later(
        fresh_engine, db_url, sink, workers):
    """An application that found every worker busy skips its wake-ups for BUSY_WAKE_INTERVAL; a worker that says it
    idles meanwhile claims once at once and once more after that interval, so an event committed between the two,
    with no wake-up sent for it, arrives within a second, not at the worker's next poll (30 s here)."""
    set_idle_flag(db_url, None)
    worker = workers(db_url, sink.url, "--poll-interval", "30")
    assert wait_until(lambda: _flag_ahead_s(fresh_engine) > 0, 30), worker.output()  # it said so: it just claimed
    time.sleep(0.1)
    with psycopg.connect(conninfo(db_url)) as conn:  # no wake_workers: as a call skipped within the interval
        insert_id = outbox.enqueue(conn, purchase())
        conn.commit()
    committed = time.monotonic()
    assert wait_until(lambda: received(sink, insert_id), 5), worker.output()
    print(f"arrived {time.monotonic() - committed:.2f} s after the commit")
