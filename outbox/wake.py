"""Waking idle workers after the caller's commit, outside the caller's transaction, debounced per process.

A NOTIFY inside the business transaction makes PostgreSQL take one cluster-wide lock at that
transaction's commit, held through the commit's flush, so every enqueuing transaction on the server
would commit one at a time. `enqueue` therefore writes a plain INSERT, and the wake-up is sent afterwards, on a
connection of its own: `SELECT fp_outbox_wake_if_idle()` (migration 0011), which NOTIFYs only while the moment an
idle worker said it listens until (fp_outbox_listening) lies ahead, otherwise reads one row, and says which it did.
Busy workers claim again on their own; a NOTIFY for them would be a transaction with its own commit and flush, and a
signal to every listener. On a schema before 0011 (the application upgraded before `fp-outbox migrate`) it is 0009's
fp_outbox_wake(), which does the same without saying so, and before 0009 the NOTIFY itself.

- SQLAlchemy `Session` / `AsyncSession`: from an `after_commit` listener, once the commit is done.
- SQLAlchemy `Connection` / `AsyncConnection`: their only hook, `ConnectionEvents.commit`, fires just
  before the commit, so the wake-up waits `COMMIT_GRACE` first (a worker that still finds nothing
  picks the event up at its next poll).
- psycopg connections have no commit hook: call `wake_workers(conn)` (`await wake_workers_async(conn)`)
  after the commit. Not debounced (no thread of its own), but once a call found every worker busy, the calls on
  that connection send nothing for BUSY_WAKE_INTERVAL: a worker going idle claims again that long after it says so.

Per engine and process, the first wake-up goes at once, then at most one per `WAKE_INTERVAL`, with a
trailing one for anything committed meanwhile: a burst of commits costs a few notifications, not one each. A wake-up
that found every worker busy spaces the next by `BUSY_WAKE_INTERVAL` instead (a commit meanwhile is still woken for,
at its end): through a busy spell a process checks four times a second, not forty.
Waking is best effort and never blocks or fails the caller: the workers poll anyway.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, scoped_session

from outbox.schema import NOTIFY_CHANNEL

#: At most one wake-up per engine per process in this many seconds.
WAKE_INTERVAL = 0.025
#: ...and in this many, after a wake-up that found every worker busy: the most a commit then waits for its wake-up,
#: should a worker go idle meanwhile (busy workers claim it on their own).
BUSY_WAKE_INTERVAL = 0.25
#: Seconds a wake-up for a Connection waits: its commit event fires before the commit itself.
COMMIT_GRACE = 0.010
#: A waker thread with nothing to do for this long ends; the next commit starts another.
IDLE_EXIT = 60.0

#: The wake-up: true when it notified (a worker idles), false when every worker is busy.
WAKE_SQL = "SELECT fp_outbox_wake_if_idle()"
#: On a schema before 0011: the same, saying nothing (void).
WAKE_SQL_0009 = "SELECT fp_outbox_wake()"
#: On a schema before 0009, which has neither function.
UNCONDITIONAL_WAKE_SQL = f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"
#: Each wake-up, newest schema first: the next is what a schema without the one before it takes.
WAKE_LADDER = (WAKE_SQL, WAKE_SQL_0009, UNCONDITIONAL_WAKE_SQL)
UNDEFINED_FUNCTION = "42883"
#: Once an engine's (or a psycopg connection's) database lacked a wake-up function, its wake-ups start further down
#: WAKE_LADDER for this long before the function is tried again: not a failing statement (and an error in the
#: server's log) at every wake-up until `fp-outbox migrate`.
RETRY_WAKE_FUNCTION_AFTER = 60.0

_PENDING = "fp_outbox_wake_pending"  # session.info / connection.info: this transaction enqueued
_WAKE_UP = "fp_outbox_wake_up"  # session.info: how to wake this session's engine, once listening

log = logging.getLogger(__name__)


class Debounce:
    """When to send: the first request at once, then at most one per interval, and one more for any
    request whose moment (its commit) came after the last send began. Pure bookkeeping, no clock."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._first_due: float | None = None  # the earliest request not yet covered by a send
        self._last_due = -math.inf
        self._sent_at = -math.inf

    def request(self, due: float) -> None:
        if self._first_due is None:
            self._first_due = due
        self._last_due = max(self._last_due, due)

    def next_send(self) -> float | None:
        """The moment of the next send, or None when nothing is asked."""
        if self._first_due is None:
            return None
        return max(self._first_due, self._sent_at + self.interval)

    def sending(self, now: float) -> None:
        """A send starts at `now`: it covers every request due by then."""
        self._sent_at = now
        self._first_due = self._last_due if self._last_due > now else None


class Waker:
    """Sends one engine's wake-ups from a daemon thread, on a connection checked out of that engine."""

    def __init__(self, engine: Engine) -> None:
        self.pid = os.getpid()
        self._engine = weakref.ref(engine)
        self._debounce = Debounce(WAKE_INTERVAL)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._failing = False

    def poke(self, delay: float = 0.0) -> None:
        """Ask for a wake-up `delay` seconds from now (debounced); never blocks on the database."""
        with self._cond:
            self._debounce.request(time.monotonic() + delay)
            if self._thread is None or not self._thread.is_alive():  # none yet, or one that never ran or died
                thread = threading.Thread(target=self._run, name="fp-outbox-waker", daemon=True)
                thread.start()  # may raise (a thread limit): then the next poke tries again
                self._thread = thread
            self._cond.notify()

    def _run(self) -> None:
        while self._wait_for_send():
            engine = self._engine()
            if engine is None:
                return
            try:
                idle = _notify(engine)
                self._failing = False
            except Exception as exc:  # best effort: the workers poll anyway
                self._failing = _log_once(self._failing, exc)
                continue
            with self._cond:
                self._debounce.interval = _next_interval(idle)

    def _wait_for_send(self) -> bool:
        """Block until the next send is due; False (and the thread ends) after IDLE_EXIT of nothing."""
        with self._cond:
            while True:
                at, now = self._debounce.next_send(), time.monotonic()
                if at is None:
                    if not self._cond.wait(IDLE_EXIT) and self._debounce.next_send() is None:
                        self._thread = None
                        return False
                elif at <= now:
                    self._debounce.sending(now)
                    return True
                else:
                    self._cond.wait(at - now)


class AsyncWaker:
    """Sends one async engine's wake-ups as a task on the event loop the application runs."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._engine = weakref.ref(engine)
        self._debounce = Debounce(WAKE_INTERVAL)
        self._task: asyncio.Task | None = None
        self._failing = False

    def poke(self, delay: float = 0.0) -> None:
        self._debounce.request(self.loop.time() + delay)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run(), name="fp-outbox-waker")

    async def _run(self) -> None:
        while (at := self._debounce.next_send()) is not None:
            if at > self.loop.time():
                await asyncio.sleep(at - self.loop.time())
                continue
            self._debounce.sending(self.loop.time())
            engine = self._engine()
            if engine is None:
                return
            try:
                idle = await _notify_async(engine)
                self._failing = False
            except Exception as exc:  # best effort: the workers poll anyway
                self._failing = _log_once(self._failing, exc)
                continue
            self._debounce.interval = _next_interval(idle)


_wakers: weakref.WeakKeyDictionary[Engine, Waker] = weakref.WeakKeyDictionary()
_async_wakers: weakref.WeakKeyDictionary[Engine, AsyncWaker] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _waker_for(engine: Engine) -> Waker:
    """The engine's waker in this process: a fork's child gets its own (the parent's thread is not there)."""
    waker = _wakers.get(engine)
    if waker is None or waker.pid != os.getpid():
        with _registry_lock:
            waker = _wakers.get(engine)
            if waker is None or waker.pid != os.getpid():
                waker = _wakers[engine] = Waker(engine)
    return waker


def _poke(engine: Engine, delay: float = 0.0) -> None:
    _waker_for(engine).poke(delay)


def _poke_async(async_engine: Any, delay: float = 0.0) -> None:
    try:
        loop = asyncio.get_running_loop()  # the listener runs in SQLAlchemy's greenlet, on the loop's thread
    except RuntimeError:
        return  # no loop running: the workers' next poll finds the event
    waker = _async_wakers.get(async_engine.sync_engine)
    if waker is None or waker.loop is not loop:
        waker = _async_wakers[async_engine.sync_engine] = AsyncWaker(async_engine, loop)
    waker.poke(delay)


# -- arranging the wake-up when enqueue writes ---------------------------------------------------

def after_commit(handle: Session | scoped_session | Connection) -> None:
    """Wake the workers once `handle`'s transaction commits (nothing if it rolls back)."""
    if isinstance(handle, Connection):
        _watch_connection(handle, partial(_poke, handle.engine))
        return
    session = handle() if isinstance(handle, scoped_session) else handle
    _watch_session(session, lambda: partial(_poke, session.get_bind().engine))


async def after_commit_async(handle: Any) -> None:
    """`after_commit` for SQLAlchemy's AsyncSession (through its sync_session) and AsyncConnection."""
    if hasattr(handle, "sync_session"):
        engine = None if _WAKE_UP in handle.sync_session.info else (await handle.connection()).engine
        _watch_session(handle.sync_session, lambda: partial(_poke_async, engine))
        return
    _watch_connection(handle.sync_connection, partial(_poke_async, handle.engine))


def _watch_session(session: Session, make_wake_up: Callable[[], Callable[..., None]]) -> None:
    info = session.info
    if _WAKE_UP not in info:  # the first enqueue on this Session: listen once
        info[_WAKE_UP] = make_wake_up()
        event.listen(session, "after_commit", _session_committed)
        event.listen(session, "after_transaction_end", _session_transaction_ended)
    info[_PENDING] = True


def _session_committed(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint was released; the transaction goes on
    if session.info.pop(_PENDING, False):
        _never_fail(session.info[_WAKE_UP])


def _session_transaction_ended(session: Session, transaction: Any) -> None:
    # The outermost transaction ended without after_commit taking the mark: rolled back or closed.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


def _watch_connection(conn: Connection, wake_up: Callable[..., None]) -> None:
    if not event.contains(conn, "commit", _connection_committing):
        event.listen(conn, "commit", _connection_committing)
        event.listen(conn, "rollback", _connection_rolled_back)
    conn.info[_PENDING] = wake_up


def _connection_committing(conn: Connection) -> None:
    wake_up = conn.info.pop(_PENDING, None)
    if wake_up is not None:
        _never_fail(wake_up, COMMIT_GRACE)  # this event fires before the commit: let it land first


def _connection_rolled_back(conn: Connection) -> None:
    conn.info.pop(_PENDING, None)


def _never_fail(wake_up: Callable[..., None], *args: float) -> None:
    """An error here would surface from the caller's commit: swallow it (a thread that cannot start)."""
    try:
        wake_up(*args)
    except Exception as exc:
        _log_once(False, exc)


# -- sending -------------------------------------------------------------------------------------

# Per engine, or per psycopg connection for wake_workers: (where on WAKE_LADDER its wake-ups start, until when).
_ladder_from: weakref.WeakKeyDictionary[Any, tuple[int, float]] = weakref.WeakKeyDictionary()


def _next_interval(idle: bool) -> float:
    """The debounce after a wake-up: spaced out once it found every worker busy (`idle` False)."""
    return WAKE_INTERVAL if idle else BUSY_WAKE_INTERVAL


def _notify(engine: Engine) -> bool:
    """One wake-up on a connection of `engine`'s; False when it found every worker busy."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for step, sql in _ladder(engine):
            try:
                return conn.exec_driver_sql(sql).scalar() is not False
            except DBAPIError as exc:
                _no_wake_function(engine, step, exc)
    return True


async def _notify_async(async_engine: Any) -> bool:
    async with async_engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for step, sql in _ladder(async_engine.sync_engine):
            try:
                return (await conn.exec_driver_sql(sql)).scalar() is not False
            except DBAPIError as exc:
                _no_wake_function(async_engine.sync_engine, step, exc)
    return True


def _ladder(sender: Any) -> list[tuple[int, str]]:
    """The wake-ups `sender` (an engine, or a psycopg connection) tries now, in order, each with its step."""
    step, until = _ladder_from.get(sender, (0, 0.0))
    if until <= time.monotonic():
        step = 0
    return list(enumerate(WAKE_LADDER))[step:]


def _no_wake_function(sender: Any, step: int, exc: Exception) -> None:
    """Re-raise `exc` unless it says the schema lacks this step's function; if it does, start a step further down
    for a while."""
    if getattr(getattr(exc, "orig", exc), "sqlstate", None) != UNDEFINED_FUNCTION or step + 1 >= len(WAKE_LADDER):
        raise exc
    _ladder_from[sender] = (step + 1, time.monotonic() + RETRY_WAKE_FUNCTION_AFTER)


def _log_once(failing: bool, exc: Exception) -> bool:
    """Log a failed wake-up at debug level, once until one succeeds again; returns True (failing)."""
    if not failing:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.debug("could not wake the workers (they find the event at their next poll): %s", reason)
    return True


# -- the explicit wake-up for psycopg connections ------------------------------------------------

# Per psycopg connection: until when (time.monotonic()) wake_workers skips its calls, the last one on it having found
# every worker busy. A worker that says it idles after not listening claims again BUSY_WAKE_INTERVAL later
# (worker.engine.idleflag), so what a skipped call would have woken it for is found then.
_busy_until: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _found_busy(conn: Any, sent_at: float, answer: Any) -> None:
    """A wake-up sent on `conn` at `sent_at` answered: if it found every worker busy, skip its calls for a while."""
    if answer is False:
        _busy_until[conn] = sent_at + BUSY_WAKE_INTERVAL


def wake_workers(conn: Any) -> None:
    """Wake idle workers now, on a psycopg `Connection`, after your transaction committed.

    psycopg has no commit hook, so call this after `conn.commit()` (or from Django's
    `transaction.on_commit`). Without it, workers find the event at their next poll. Never raises a
    database error: waking is best effort. For BUSY_WAKE_INTERVAL after a call that found every worker busy, calls on
    the same connection send nothing.
    """
    psycopg = _psycopg_for(conn, "Connection", "wake_workers")
    if _busy_until.get(conn, 0.0) > time.monotonic():
        return
    sent_at, autocommit = time.monotonic(), conn.autocommit
    try:
        conn.autocommit = True  # a transaction of its own, never the caller's
        try:
            for step, sql in _ladder(conn):
                try:
                    _found_busy(conn, sent_at, conn.execute(sql).fetchone()[0])
                    break
                except psycopg.errors.UndefinedFunction as exc:
                    _no_wake_function(conn, step, exc)
        finally:
            conn.autocommit = autocommit
    except psycopg.Error as exc:
        _log_once(False, exc)


async def wake_workers_async(conn: Any) -> None:
    """`wake_workers` for a psycopg `AsyncConnection`."""
    psycopg = _psycopg_for(conn, "AsyncConnection", "wake_workers_async")
    if _busy_until.get(conn, 0.0) > time.monotonic():
        return
    sent_at, autocommit = time.monotonic(), conn.autocommit
    try:
        await conn.set_autocommit(True)
        try:
            for step, sql in _ladder(conn):
                try:
                    row = await (await conn.execute(sql)).fetchone()
                    _found_busy(conn, sent_at, row[0])
                    break
                except psycopg.errors.UndefinedFunction as exc:
                    _no_wake_function(conn, step, exc)
        finally:
            await conn.set_autocommit(autocommit)
    except psycopg.Error as exc:
        _log_once(False, exc)


def _psycopg_for(conn: Any, class_name: str, function: str) -> Any:
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(conn, getattr(psycopg, class_name)):
        raise TypeError(f"{function} takes a psycopg {class_name} (SQLAlchemy sessions and connections wake "
                        f"the workers by themselves at commit), got {type(conn).__name__}")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError(f"call {function} after commit, outside a transaction: inside one, the wake-up "
                         "would be held until that commit, and would make commits wait for one another")
    return psycopg
