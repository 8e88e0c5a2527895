"""The worker's database connections on a network that fails silently: TCP keepalives and tcp_user_timeout
on every socket, the server's timeouts set per transaction, and the worker's own deadline, which is what
catches a link that swallows packets without closing (a proxy of the test's that stops forwarding)."""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

import outbox
from tests.conftest import status_of, wait_until
from worker.engine.timeouts import CALL_DEADLINE, STATEMENT_TIMEOUT

FAST = ["--connect-timeout", "0.5", "--read-timeout", "1", "--inline-attempts", "2", "--retry-base", "0.2",
        "--retry-cap", "1", "--poll-interval", "0.2", "--max-attempts", "100"]


class SwallowingProxy:
    """Forwards TCP connections to PostgreSQL until swallow(): then the connections open at that moment stay
    open and nothing more crosses them, either way (the kernel still acknowledges what it buffers, as a
    middlebox would), while new connections work. After black_hole(), new connections are accepted and held,
    never forwarded: the database is gone without a word."""

    def __init__(self, target: tuple) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._held: list[socket.socket] = []
        self._holding = False
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def swallow(self) -> None:
        for *_, swallowed in self._pairs:
            swallowed.set()

    def black_hole(self) -> None:
        self._holding = True
        self.swallow()  # its pumps notice within their 0.1 s select

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for client, server, _ in self._pairs:
            client.close()
            server.close()
        for client in self._held:
            client.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._holding:
                self._held.append(client)
                continue
            family = socket.AF_UNIX if isinstance(self._target, str) else socket.AF_INET
            server = socket.socket(family, socket.SOCK_STREAM)
            server.connect(self._target)
            pair = (client, server, threading.Event())
            self._pairs.append(pair)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, pair[2]), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, swallowed: threading.Event) -> None:
        try:
            while not swallowed.is_set() and not self._closed.is_set():
                if select.select([src], [], [], 0.1)[0]:
                    data = src.recv(65536)
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
        except OSError:
            return


def proxy_to(server_url: URL) -> SwallowingProxy:
    """A SwallowingProxy in front of the test server (TCP, or the embedded server's Unix socket)."""
    host = server_url.host or server_url.query.get("host")
    port = server_url.port or 5432
    return SwallowingProxy((host, port) if not str(host).startswith("/") else f"{host}/.s.PGSQL.{port}")


@pytest.fixture
def proxy(server_url: URL) -> Iterator[SwallowingProxy]:
    swallowing = proxy_to(server_url)
    yield swallowing
    swallowing.close()


def test_a_link_that_swallows_packets_is_cut_at_the_deadline_and_nothing_is_lost(clean, db_url, proxy, sink,
                                                                                 workers):
    with Session(clean) as session:
        committed = outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": str(i)}}
                                                  for i in range(400)])
        session.commit()
    sink.set_faults(latency=0.02)
    worker = workers(db_url.set(host="127.0.0.1", port=proxy.port, query={}), sink.url, "--concurrency", "4",
                     *FAST)
    assert wait_until(lambda: len(sink.accepted()) >= 40, 30), worker.output()
    swallowed_at = time.monotonic()
    proxy.swallow()  # every connection the worker holds now goes silent
    assert wait_until(lambda: "outlived its deadline" in worker.output(), CALL_DEADLINE + 10), worker.output()
    detected_after = time.monotonic() - swallowed_at
    assert wait_until(lambda: {r.insert_id for r in sink.accepted()} >= set(committed), 90), worker.output()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()
    assert status_of(clean) == {"delivered": 400}
    # The deadline, plus the watch's period and a loaded machine's scheduling.
    assert detected_after < CALL_DEADLINE + 3, detected_after
    print("DETECTED", detected_after)
    assert "Traceback" not in worker.output(), worker.output()


def test_a_stop_fits_30_s_with_the_database_black_holed_and_every_request_hanging(clean, db_url, proxy, workers):
    """The worst stop: SIGTERM lands while the loop waits on a database call that will never be answered, every
    request in flight hangs (and is re-sent, and hangs again), and every database call after the signal meets
    a black hole, connection attempts included. The stop budget still ends it within 30 s, with exit 0."""
    from worker.devtools.fast_receiver import ReceiverProcess

    with Session(clean) as session:
        outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": str(i)}} for i in range(4)])
        session.commit()
    with ReceiverProcess(mode="hang") as hanging:
        # A request may take 17 s; with 8 slots for 4 rows the loop keeps claiming (every 50 ms) while they hang.
        worker = workers(db_url.set(host="127.0.0.1", port=proxy.port, query={}), hanging.url, "--concurrency", "8",
                         "--connect-timeout", "3", "--read-timeout", "14", "--inline-attempts", "2",
                         "--poll-interval", "0.2")
        assert wait_until(lambda: hanging.stats()["requests"] >= 4, 30), worker.output()
        proxy.black_hole()
        time.sleep(1.0)  # the loop's next claim is on its way into the black hole
        stopped = time.monotonic()
        worker.signal(signal.SIGTERM)
        code = worker.wait(60)
        took = time.monotonic() - stopped
    assert code == 0, worker.output()
    print(f"stopped in {took:.1f} s")
    assert took < 30, f"the worker took {took:.1f} s to stop\n{worker.output()}"
    assert "Traceback" not in worker.output()


def test_a_stop_brings_the_end_of_every_database_call_forward_connection_attempts_included(clean, db_url, proxy):
    """What the stop budget rests on: once capped, a call under way ends at the cap (not at its own deadline),
    a connection attempt waits only what the cap leaves (not libpq's 10 s), and none starts with too little."""
    from outbox.db import make_engine
    from worker.engine.store import DatabaseUnavailable, Store
    from worker.engine.timeouts import CallDeadlines

    engine = make_engine(db_url.set(host="127.0.0.1", port=proxy.port, query={}), pool_pre_ping=False)
    deadlines = CallDeadlines()
    deadlines.attach(engine)
    store = Store(engine, "me", 30.0)
    try:
        store.anything_unfinished()  # a pooled connection, through the proxy
        proxy.black_hole()
        time.sleep(0.3)  # the proxy's pumps look every 0.1 s
        capping = threading.Timer(0.5, lambda: deadlines.cap(time.monotonic() + 1.0))
        capping.start()
        for budget in (1.5, 3.5, 0.0):  # under way when capped; connecting (3 s left); no time left to connect
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                store.anything_unfinished()
            took = time.monotonic() - started
            assert took < budget + 1.0, (budget, took)
            deadlines.cap(time.monotonic() + 3.6 if budget == 1.5 else time.monotonic() + 1.5)
    finally:
        engine.dispose()


def test_the_deadline_watch_survives_a_connection_it_cannot_read_and_keeps_cutting(db_url):
    """On a lost connection, pgconn.socket raises psycopg.OperationalError: the watch must not die of it (it
    did, and the deadline was gone for the life of the process). A call past its deadline later is still cut."""
    import psycopg

    from worker.engine.timeouts import CallDeadlines

    deadlines = CallDeadlines(deadline=0.5)
    lost = psycopg.connect(_conninfo(db_url))
    lost.close()
    with deadlines.guard(lost):
        time.sleep(1.0)  # the watch finds it past its deadline, and cannot read its socket
    _assert_a_long_call_is_cut(deadlines, db_url)


def test_a_deadline_watch_that_died_is_started_again(db_url):
    from worker.engine.timeouts import CallDeadlines

    deadlines = CallDeadlines(deadline=0.5)
    dead = threading.Thread(target=lambda: None)  # as a watch thread that ended, whatever ended it
    dead.start()
    dead.join()
    deadlines._thread = dead
    _assert_a_long_call_is_cut(deadlines, db_url)


def _conninfo(db_url) -> str:
    return db_url.set(drivername="postgresql").render_as_string(hide_password=False)


def _assert_a_long_call_is_cut(deadlines, db_url) -> None:
    """A 10 s statement under `deadlines` (0.5 s) fails within a few seconds: its connection was cut."""
    import psycopg

    with psycopg.connect(_conninfo(db_url), autocommit=True) as live:
        started = time.monotonic()
        with deadlines.guard(live), pytest.raises(psycopg.OperationalError):
            live.execute("SELECT pg_sleep(10)")
        assert time.monotonic() - started < 3


def test_every_worker_connection_has_keepalives_and_the_servers_timeouts(db_url):
    from worker.engine import Worker, build_parser, from_args

    settings = from_args(build_parser().parse_args(["--database-url", db_url.render_as_string(hide_password=False)]),
                         environ={})
    worker = Worker(settings)
    try:
        with worker.engine.begin() as conn:
            shown = conn.execute(text("SELECT current_setting('statement_timeout'), "
                                      "current_setting('idle_in_transaction_session_timeout')")).one()
            dbapi = conn.connection.dbapi_connection
            parameters = dbapi.info.get_parameters()
            sock = socket.socket(fileno=dbapi.pgconn.socket)
            try:  # on TCP, on the socket itself (a Unix socket, the embedded server's, has no TCP options)
                tcp = sock.family != socket.AF_UNIX
                keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) if tcp else 1
                user_timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) if tcp else 1
            finally:
                sock.detach()  # the driver's socket: look, don't close
        raw = worker.engine.raw_connection()  # the same pooled connection, past SQLAlchemy's begin
        try:
            outside = raw.driver_connection.execute("SELECT current_setting('statement_timeout')").fetchone()[0]
        finally:
            raw.close()
    finally:
        worker.engine.dispose()
    assert tuple(shown) == (f"{int(STATEMENT_TIMEOUT)}s", f"{int(STATEMENT_TIMEOUT)}s")
    assert parameters["keepalives"] == "1" and int(parameters["tcp_user_timeout"]) > 0
    assert keepalive == 1 and user_timeout > 0
    assert outside == "0"  # set per transaction: nothing stays behind on the session (or a pooled server)


def test_the_cycles_statements_run_under_the_servers_limits_and_leave_none_behind(clean, db_url, monkeypatch):
    """A claim and a settle carry the limits in their own message (worker.engine.roundtrip): a claim stuck
    behind a lock is cancelled by the server at the statement timeout (shortened here), not left to the
    worker's deadline, and the connection goes back to the pool with nothing set on it."""
    from sqlalchemy.orm import Session

    from outbox.db import make_engine
    from worker.engine import roundtrip, timeouts
    from worker.engine.store import DatabaseUnavailable, Store

    monkeypatch.setattr(timeouts, "_SET_LIMITS", timeouts.server_limits(0.5))
    roundtrip.message.cache_clear()
    engine = make_engine(db_url, pool_size=1, max_overflow=0, pool_pre_ping=False)
    timeouts.CallDeadlines().attach(engine)  # as the worker's: had the server's limit failed, this cuts the call
    try:
        with Session(clean) as session:
            outbox.enqueue(session, {"event": "E", "properties": {"distinct_id": "u"}})
            session.commit()
        store = Store(engine, "me", 30.0)
        with clean.connect() as blocker:
            blocker.execute(text("LOCK TABLE fp_outbox_claims IN EXCLUSIVE MODE"))  # the claim must wait
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="statement timeout"):
                store.claim_fresh(10, 1e6)
            waited = time.monotonic() - started
            blocker.rollback()
        assert 0.5 <= waited < CALL_DEADLINE, waited
        assert len(store.claim_fresh(10, 1e6)[0]) == 1  # the same pooled connection, still usable
        raw = engine.raw_connection()
        try:
            left = raw.driver_connection.execute("SELECT current_setting('statement_timeout')").fetchone()[0]
            assert left == "0" and not raw.driver_connection.autocommit
        finally:
            raw.close()
    finally:
        engine.dispose()
        roundtrip.message.cache_clear()
