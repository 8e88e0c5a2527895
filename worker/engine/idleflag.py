"""Saying that this worker idles: the applications wake the workers only while one has said so (fp_outbox_listening,
migration 0009; see outbox.wake). Before an idle wait the worker says it listens for IDLE_SPAN waits ahead, and
again before that runs out, and claims once more after saying it: an event committed before the applications could
see it had no wake-up sent. A polling worker never says it: no wake-up reaches it. Saying it is a write: once it
succeeds, a database that was read-only takes writes again, even while no event comes to prove it."""

from __future__ import annotations

import logging
import time

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from worker.engine.logs import event, first_line, log

IDLE_SPAN = 3  # an idle worker says it listens for this many of its waits ahead, and two margins more
IDLE_MARGIN = 0.5  # seconds: and says it again once less than one wait and a margin is left
SAY_IDLE = text("SELECT fp_outbox_listening(CAST(:seconds AS float8))")


class IdleFlag:
    """What this worker last said of its idling, and saying it again when a wait would outlast it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._until = 0.0  # monotonic time until which this worker last said it listens

    def say(self, wait: float) -> bool:
        """Before an idle wait of `wait` seconds: make sure the applications wake this worker throughout it. True
        when it was said just now: claim once more before waiting."""
        now = time.monotonic()
        if self._until - now > wait + IDLE_MARGIN:
            return False
        span = IDLE_SPAN * wait + 2 * IDLE_MARGIN
        try:
            with self._engine.begin() as conn:
                conn.execute(SAY_IDLE, {"seconds": span})
        except (psycopg.Error, SQLAlchemyError, OSError) as exc:  # best effort: the poll finds the event all the same
            event(log, logging.DEBUG, "could not say this worker idles; it polls", error=first_line(exc))
            return False
        self._until = now + span
        return True
