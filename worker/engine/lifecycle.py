"""A worker's start and end: reaching the database before claiming anything, and on stop, finishing or
releasing what is in flight."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import Engine, inspect

from outbox.schema import events
from worker.engine.claimer import Claimer
from worker.engine.inflight import InFlight
from worker.engine.logs import event, first_line, log
from worker.engine.services import StopSignal
from worker.engine.settler import Settler
from worker.engine.store import EXIT_NO_SCHEMA, NO_TABLE, DatabaseRefused


class StartupError(Exception):
    """The database stayed unreachable for the whole start-up timeout."""


def wait_for_database(engine: Engine, startup_timeout: timedelta, stopping: StopSignal) -> None:
    """Retry until the database answers and has the outbox table; raise StartupError, or DatabaseRefused."""
    deadline = time.monotonic() + startup_timeout.total_seconds()
    delay = 0.5
    while True:
        try:
            with engine.connect() as conn:
                has_table = inspect(conn).has_table(events.name)
            break
        except Exception as exc:  # any failure to connect: keep trying until the deadline
            if time.monotonic() + delay > deadline or stopping.is_set():
                raise StartupError(
                    f"could not reach the database within {startup_timeout.total_seconds():.0f} s "
                    f"({first_line(exc)}); check --database-url and that PostgreSQL is running"
                ) from None
            event(log, logging.WARNING, "database not reachable yet, retrying", error=first_line(exc),
                  retry_in_s=delay)
            stopping.pause(delay)
            delay = min(delay * 2, 5.0)
    if not has_table:
        raise DatabaseRefused(NO_TABLE, EXIT_NO_SCHEMA)


def finish_or_release(in_flight: InFlight, settler: Settler, claimer: Claimer, grace: timedelta,
                      stopping: StopSignal) -> int:
    """On stop: let the sends in flight finish for up to `grace`, then start no request any more, settle every
    outcome, and release the rows still being sent (due at once, their attempt not counted). Returns how many
    were released."""
    deadline = time.monotonic() + grace.total_seconds()
    while in_flight and time.monotonic() < deadline:
        settler.collect(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
        stopping.keepalive()
    in_flight.close()  # before the release: once released, a row must never see a request from us again
    settler.collect(timeout=0)
    settler.settle(force=True)
    leftover = in_flight.rows()
    # If settling just failed, the database is away and a release would only spend another call's deadline
    # of the 30 s a stop may take: the leases bring those rows back.
    if leftover and not settler.unsettled:
        claimer.release(leftover)
    return len(leftover)
