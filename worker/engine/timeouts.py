"""How long the worker's database calls may take: the server's limits, set at the start of every transaction,
and the worker's own deadline, which holds even when the network swallows packets without a word.

The server's: `statement_timeout` and `idle_in_transaction_session_timeout` (a transaction whose client
vanished must not keep its row locks), set per transaction with set_config(..., true) (never a session
setting or the `options` startup parameter, which PgBouncer's transaction pooling does not allow). The
cycle's statements carry them in the same message (with_server_limits, worker.engine.roundtrip); every
other transaction of the engine gets them at its start, in a round trip of their own.

The worker's own: a watch thread that shuts down the socket of any pooled connection held longer than
CALL_DEADLINE. TCP keepalives and tcp_user_timeout (outbox.db) catch a dead peer on an idle connection or
unacknowledged sends, but not a middlebox that acknowledges and then drops everything: only a deadline of
our own does.

The numbers come from the worker's other deadlines: a loop turn that waits on one call of at most
CALL_DEADLINE (7 s), then backs off feeding the watchdog, stays well inside WatchdogSec=30. A stop brings
every call's end closer (cap(): the stop budget, worker.engine.settings.StopBudget), connection attempts
included, so that the stop fits its 30 s however the database behaves.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
from sqlalchemy import Connection, Engine, event

from worker.engine.logs import event as log_event
from worker.engine.logs import log

STATEMENT_TIMEOUT = 5.0  # seconds: any of the worker's statements takes milliseconds
CALL_DEADLINE = STATEMENT_TIMEOUT + 2.0  # seconds a connection may be held: the server's limit comes first
WATCH_EVERY = 0.25  # seconds between the watch's looks at the connections in use
MIN_CONNECT_TIMEOUT = 2  # seconds: libpq (and psycopg) wait at least this long for a connection, whatever is asked


def server_limits(seconds: float) -> str:
    """The statement that sets the server's limits to `seconds` for the rest of its transaction, and turns JIT
    off for it: the worker's statements take milliseconds, and compiling one (when its estimated cost passes
    jit_above_cost, as a claim over a big backlog's may) takes a hundred."""
    ms = int(seconds * 1000)
    return (f"SELECT set_config('statement_timeout', '{ms}', true) AS statement_timeout, "
            f"set_config('idle_in_transaction_session_timeout', '{ms}', true) AS idle_in_transaction_session_timeout, "
            "set_config('jit', 'off', true) AS jit")


_SET_LIMITS = server_limits(STATEMENT_TIMEOUT)


class CallDeadlines:
    """Arms a deadline on every connection the engine's pool hands out, and cuts the ones that overrun."""

    def __init__(self, deadline: float = CALL_DEADLINE) -> None:
        self._deadline = deadline
        self._armed: dict[int, tuple[float, object]] = {}  # id(pool entry or connection) -> (deadline, dbapi conn)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cap = math.inf  # no call outlives this (time.monotonic()), once a stop set it

    def attach(self, engine: Engine) -> None:
        """Limit every transaction of `engine` on the server, and every checkout from its pool here (and, once
        capped, every connection attempt)."""
        event.listen(engine, "begin", _set_server_limits)
        event.listen(engine, "do_connect", self._limit_connect)
        event.listen(engine.pool, "checkout", lambda dbapi, entry, _proxy: self._arm(id(entry), dbapi))
        for name in ("checkin", "detach", "invalidate"):  # back in the pool, taken out of it, or dropped
            event.listen(engine.pool, name, lambda _dbapi, entry, *_: self._disarm(id(entry)))

    def cap(self, until: float) -> None:
        """From now on no call or connection attempt outlives `until` (time.monotonic()), those under way
        included. Takes no lock: a signal handler may call it."""
        self._cap = until

    def _limit_connect(self, _dialect, _record, _cargs, cparams: dict) -> None:
        """A connection attempt made once capped waits no longer than the cap leaves (or is not made)."""
        if self._cap == math.inf:
            return
        left = math.floor(self._cap - time.monotonic())
        if left < MIN_CONNECT_TIMEOUT:
            raise psycopg.OperationalError("no time left to connect: the worker is stopping")
        cparams["connect_timeout"] = min(int(cparams.get("connect_timeout") or left), left)

    @contextlib.contextmanager
    def guard(self, dbapi_connection) -> Iterator[None]:
        """The same deadline around statements on a connection of its own (the listener's)."""
        self._arm(id(dbapi_connection), dbapi_connection)
        try:
            yield
        finally:
            self._disarm(id(dbapi_connection))

    def _arm(self, key: int, dbapi_connection) -> None:
        with self._lock:
            self._armed[key] = (min(time.monotonic() + self._deadline, self._cap), dbapi_connection)
            if self._thread is None or not self._thread.is_alive():  # never started, or died: (re)start it
                self._thread = threading.Thread(target=self._watch, name="fp-outbox-db-deadline", daemon=True)
                self._thread.start()

    def _disarm(self, key: int) -> None:
        with self._lock:
            self._armed.pop(key, None)

    def _watch(self) -> None:
        failing = False
        while True:
            time.sleep(WATCH_EVERY)
            try:
                self._look()
                failing = False
            except Exception as exc:  # whatever a connection does, the watch goes on: it is the only deadline
                if not failing:
                    log_event(log, logging.WARNING, "the database deadline's watch failed a look; it goes on",
                              error=f"{exc.__class__.__name__}: {exc}")
                failing = True

    def _look(self) -> None:
        now = time.monotonic()
        with self._lock:  # held while cutting, so a connection returned meanwhile is never cut
            for key, (deadline, dbapi_connection) in list(self._armed.items()):
                if now > min(deadline, self._cap):
                    del self._armed[key]
                    _cut(dbapi_connection, self._deadline)


def _set_server_limits(conn: Connection) -> None:
    # SQLAlchemy runs this inside begin() without beginning again; the driver sends BEGIN before it. Its
    # errors are SQLAlchemy's like any statement's (a cut connection is invalidated, then translated).
    conn.exec_driver_sql(_SET_LIMITS)


def with_server_limits(statement: str) -> str:
    """`statement` preceded by the server's limits, for one simple-query message (worker.engine.roundtrip): the
    server runs both as one implicit transaction, and starts the statement's timeout as the statement starts."""
    return f"{_SET_LIMITS};\n{statement}"


def _cut(dbapi_connection, deadline: float) -> None:
    """Shut the socket down under the driver: the call blocked on it fails at once, as on a dropped link."""
    try:
        with socket.socket(fileno=os.dup(dbapi_connection.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (psycopg.Error, OSError, ValueError, AttributeError):
        return  # closed or lost already (pgconn.socket raises psycopg's OperationalError): nothing is blocked on it
    log_event(log, logging.WARNING, "a database call outlived its deadline; its connection was cut",
              deadline_s=deadline)
