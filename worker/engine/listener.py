"""Waking an idle worker at commit: LISTEN on the outbox's channel, which enqueue NOTIFYs; polling is the
fallback whenever the listening connection is lost."""

from __future__ import annotations

import logging
import threading

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from outbox.schema import NOTIFY_CHANNEL
from worker.engine.logs import event, first_line, log


class Listener:
    """LISTEN on the outbox channel so an idle worker wakes at commit; polling is the fallback."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: psycopg.Connection | None = None

    def wait(self, timeout: float, stopping: threading.Event) -> None:
        """Return at the first notification, after `timeout` seconds, or (without a connection) on stop."""
        try:
            conn = self._connect()
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass
        except (psycopg.Error, SQLAlchemyError, OSError) as exc:
            self.close()
            event(log, logging.DEBUG, "listen connection lost; polling", error=first_line(exc))
            stopping.wait(timeout)

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            raw = self._engine.raw_connection()
            conn = raw.driver_connection
            raw.detach()  # a long-lived connection of its own, outside the pool
            conn.autocommit = True
            self._conn = conn
            self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return self._conn

    def close(self) -> None:
        """Close the listening connection, if any; the next wait opens a new one."""
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None
