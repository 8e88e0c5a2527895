"""A worker's start and end: reaching the database before claiming anything, and on stop, finishing or
releasing what is in flight within the stop budget (worker.engine.settings.StopBudget)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import Engine, inspect
from sqlalchemy.exc import DBAPIError

from outbox.schema import SCHEMA_REVISION, events, schema_compat
from worker.engine import queries
from worker.engine.claimer import Claimer
from worker.engine.inflight import InFlight
from worker.engine.logs import event, first_line, log
from worker.engine.services import StopSignal
from worker.engine.settings import StopBudget
from worker.engine.settler import Settler
from worker.engine.store import EXIT_NO_SCHEMA, NO_TABLE, DatabaseRefused, translate
from worker.engine.timeouts import CallDeadlines


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
                has_compat = inspect(conn).has_table(schema_compat.name)
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
    try:
        with engine.connect() as conn:
            revision = conn.execute(queries.SCHEMA_REVISION).scalar()
            oldest = conn.execute(queries.OLDEST_WORKER_REVISION).scalar() if has_compat else None
    except DBAPIError as exc:  # a missing grant, say: exit 4 naming it
        translated = translate(exc)
        raise translated if translated is not exc else exc from None
    check_schema(revision, oldest)


def check_schema(revision: str | None, oldest_worker_revision: str | None) -> None:
    """This worker understands its own schema (outbox.schema.SCHEMA_REVISION). An older one needs `fp-outbox
    migrate`; a newer one says which workers still work with it: this one keeps working, saying so once, or
    stops (DatabaseRefused, exit 5) with one sentence."""
    mine = SCHEMA_REVISION
    if revision == mine:
        return
    if revision is None or revision < mine:
        raise DatabaseRefused(f"the outbox schema is at revision {revision or 'none'} and this worker needs {mine}; "
                              "run `fp-outbox migrate` of this release first", EXIT_NO_SCHEMA)
    if oldest_worker_revision is not None and oldest_worker_revision <= mine:
        event(log, logging.WARNING, "the outbox schema is newer than this worker knows, and stays compatible with "
              "it: delivering; upgrade the workers when you can", schema=revision, worker_schema=mine)
        return
    raise DatabaseRefused(f"the outbox schema is at revision {revision}, newer than this worker understands ({mine}) "
                          f"and no longer compatible with it (it needs workers of revision "
                          f"{oldest_worker_revision} or later); upgrade fp-outbox on this host", EXIT_NO_SCHEMA)


# Seconds a stop waits for the requests being written when the gate closes (they take microseconds unless a
# peer stopped reading): a row still being written then is left to its lease, never released.
WRITES_WAIT = 0.5


def finish_or_release(in_flight: InFlight, settler: Settler, claimer: Claimer, budget: StopBudget,
                      stopped_at: float, stopping: StopSignal, deadlines: CallDeadlines) -> int:
    """On stop: let the sends in flight finish for the budget's grace (counted from `stopped_at`, the signal's
    time.monotonic()), then write no request any more, settle every outcome and release the rows whose requests
    were not written (due at once, their attempt not counted); every database call of this last part ends within
    the budget's `final`. Returns how many rows were released."""
    grace_ends = stopped_at + budget.grace
    while in_flight and time.monotonic() < grace_ends:
        settler.collect(timeout=min(0.2, max(0.01, grace_ends - time.monotonic())))
        stopping.keepalive()
    deadlines.cap(time.monotonic() + budget.final)
    writing = in_flight.close(WRITES_WAIT)  # before the release: once released, no byte of a request may follow
    settler.collect(timeout=0)
    settler.settle(force=True)
    leftover = [row for row in in_flight.rows() if row.id not in writing]
    # If settling just failed, the database is away and a release would only spend the rest of the budget:
    # the leases bring those rows back (and the ones still being written, whatever happens).
    if leftover and not settler.unsettled:
        claimer.release(leftover)
    return len(leftover)
