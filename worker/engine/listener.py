"""Waking an idle worker when events are committed: LISTEN on the channel the library NOTIFYs after commit,
polling whenever LISTEN does not deliver (PgBouncer's transaction pooling gives no session to listen in).
A self-addressed probe (NOTIFY a unique payload from another connection, see it arrive) proves LISTEN works,
on connecting and every REPROBE_EVERY seconds; the log says once which of the two is in use.
The applications wake only workers that said they idle (worker.engine.idleflag)."""

from __future__ import annotations

import logging
import time

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from worker.engine.logs import event, first_line, log
from worker.engine.services import KEEPALIVE_EVERY, StopSignal
from worker.engine.wakeprobe import PROBE_CHANNEL, Guard, nullguard, open_listening, send_probe

REPROBE_EVERY = 60.0  # seconds between probes of a working LISTEN, and between tries while polling
RETRY_CONNECT_AFTER = 5.0  # seconds before listening again after the connection failed
# A wake-up can come just before the commit it announces is visible (SQLAlchemy Connection's hook fires
# before the commit): after one whose claim found nothing, claim again at +10, +30 and +70 ms.
REPOLLS = (0.01, 0.03, 0.07)
MAX_READS = 1000  # reads per drain at most (about 16 MB of notifications), so a flood cannot hold the loop
_ERRORS = (psycopg.Error, SQLAlchemyError, OSError)


class Listener:
    """LISTEN on the outbox channel so an idle worker wakes at commit; polling is the fallback."""

    def __init__(self, engine: Engine, stopping: StopSignal, guard: Guard = nullguard) -> None:
        self._engine = engine
        self._guard = guard
        self._stopping = stopping
        self._conn: psycopg.Connection | None = None
        self._mode: str | None = None  # "LISTEN" or "polling", as last logged
        self._next_try = 0.0  # monotonic time of the next probe (or, while polling, of the next try)
        self._probe: tuple[str, float] | None = None  # the payload awaited, and by when
        self._repoll_at: list[float] = []

    def delivers(self) -> bool:
        """Whether wake-ups reach this worker now: LISTEN works (the connection opened and probed when due)."""
        return self._listening() is not None

    def wait(self, timeout: float) -> None:
        """Idle for up to `timeout` seconds: until a notification (or a re-poll is due) or the stop signal,
        feeding the systemd watchdog meanwhile."""
        now = time.monotonic()
        self._repoll_at = [at for at in self._repoll_at if at > now]
        if self._repoll_at:
            timeout = min(timeout, self._repoll_at.pop(0) - now)
        conn = self._listening()
        if conn is None:
            self._stopping.pause(timeout)
            return
        deadline = time.monotonic() + timeout
        while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            if self._read(conn, min(left, KEEPALIVE_EVERY)):
                return
            self._stopping.keepalive()

    def drain(self) -> None:
        """Take whatever notifications have arrived, without waiting: called every turn of the loop, busy
        or not, so the server's notification queue never waits on this worker (a full queue fails every
        NOTIFYing commit in the cluster)."""
        if self._conn is not None:
            self._read(self._conn, 0.0)

    def close(self) -> None:
        """Close the listening connection, if any; the next wait opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # psycopg's close never raises

    def _read(self, conn: psycopg.Connection, timeout: float) -> bool:
        """Read notifications for up to `timeout` seconds, returning at the first; with 0, read until none
        is left (each read takes what one recv brings). True if one was a wake-up."""
        woke = False
        try:
            for _ in range(MAX_READS):
                notes = list(conn.notifies(timeout=timeout, stop_after=1 if timeout else None))
                for note in notes:
                    if note.channel != PROBE_CHANNEL:
                        woke = True
                    elif self._probe and note.payload == self._probe[0]:
                        self._probe = None
                if timeout or not notes:
                    break
        except _ERRORS as exc:
            self._lost(exc)
            return False
        if woke:
            self._repoll_at = [time.monotonic() + delay for delay in REPOLLS]
        return woke

    def _listening(self) -> psycopg.Connection | None:
        """The listening connection, (re)opened and probed when due; None while polling."""
        now = time.monotonic()
        if self._probe is not None and now > self._probe[1]:
            self._lost(None)  # the last probe never came back: the connection no longer delivers
        if now < self._next_try:
            return self._conn
        self._next_try = now + REPROBE_EVERY
        if self._conn is None:
            self._connect()
        elif self._probe is None:
            try:
                self._probe = send_probe(self._engine)
            except _ERRORS as exc:
                self._lost(exc)
        return self._conn

    def _connect(self) -> None:
        try:
            self._conn = open_listening(self._engine, self._guard)
        except _ERRORS as exc:
            return self._lost(exc)
        if self._conn is not None:
            self._say("LISTEN", "wake-up by LISTEN: idle workers wake at each commit")
        else:
            self._say("polling", "wake-up by polling: LISTEN does not deliver on this connection "
                      "(PgBouncer in transaction pooling?); new events wait up to --poll-interval")

    def _lost(self, exc: BaseException | None) -> None:
        self.close()
        self._probe = None
        self._next_try = time.monotonic() + RETRY_CONNECT_AFTER
        event(log, logging.DEBUG, "listening connection lost; polling until it is back",
              error=first_line(exc) if exc else "a probe notification did not come back")

    def _say(self, mode: str, message: str) -> None:
        if mode != self._mode:
            self._mode = mode
            event(log, logging.INFO, message)
