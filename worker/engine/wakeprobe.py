"""Whether LISTEN works on a connection: a self-addressed probe. LISTEN on a probe channel, NOTIFY a unique
payload from another connection (as an application's commit would), and see it arrive. Through PgBouncer's
transaction pooling it never does: the LISTEN stays on whichever server connection ran it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import psycopg
from sqlalchemy import Engine, text

from outbox.schema import NOTIFY_CHANNEL

PROBE_CHANNEL = NOTIFY_CHANNEL + "_probe"  # its own channel: a probe wakes no other worker
PROBE_TIMEOUT = 1.0  # seconds a self-addressed notification may take to come back


#: Runs statements on a connection under the worker's call deadline (worker.engine.timeouts).
Guard = Callable[[psycopg.Connection], AbstractContextManager]


def nullguard(_conn: psycopg.Connection) -> AbstractContextManager:
    return nullcontext()


def open_listening(engine: Engine, guard: Guard = nullguard) -> psycopg.Connection | None:
    """A connection of its own, outside the pool, LISTENing on the outbox channel, if the probe proves that
    notifications reach it; None if they do not. Raises the driver's errors."""
    raw = engine.raw_connection()
    conn = raw.driver_connection
    raw.detach()
    try:
        conn.autocommit = True
        with guard(conn):
            conn.execute(f"LISTEN {PROBE_CHANNEL}")
        if _answered(conn, *send_probe(engine)):
            with guard(conn):
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            return conn
        # Through transaction pooling the LISTEN stays behind on a pooled server connection: take it
        # back (the pool most likely hands us that one again, it reuses the last one first).
        with guard(conn):
            conn.execute("UNLISTEN *")
    except BaseException:
        conn.close()
        raise
    conn.close()
    return None


def send_probe(engine: Engine) -> tuple[str, float]:
    """NOTIFY a unique payload on the probe channel from a pooled connection; returns it and its deadline."""
    payload = uuid.uuid4().hex
    with engine.begin() as other:
        other.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": PROBE_CHANNEL, "payload": payload})
    return payload, time.monotonic() + PROBE_TIMEOUT


def _answered(conn: psycopg.Connection, payload: str, deadline: float) -> bool:
    while (left := deadline - time.monotonic()) > 0:
        if any(n.channel == PROBE_CHANNEL and n.payload == payload
               for n in conn.notifies(timeout=left, stop_after=1)):
            return True
    return False
