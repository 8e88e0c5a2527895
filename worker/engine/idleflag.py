"""Saying that this worker idles: the applications wake the workers only while one has said so (fp_outbox_listening,
migration 0009; see outbox.wake). Before an idle wait the worker says it listens for IDLE_SPAN waits ahead, and
again before that runs out, and claims once more after saying it: an event committed before the applications could
see it had no wake-up sent. When it says so after a spell of not listening (busy, or just started), it also claims
again BUSY_WAKE_INTERVAL after, once: an application that found every worker busy may skip its wake-ups for that long
(outbox.wake: wake_workers on a psycopg connection). A polling worker never says it: no wake-up reaches it. Saying it
is a write: once it succeeds, a database that was read-only takes writes again, even while no event comes to prove
it."""

from __future__ import annotations

import logging
import time

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from outbox.wake import BUSY_WAKE_INTERVAL
from worker.engine.logs import event, first_line, log

IDLE_SPAN = 3  # an idle worker says it listens for this many of its waits ahead, and two margins more
IDLE_MARGIN = 0.5  # seconds: and says it again once less than one wait and a margin is left
RECHECK_MARGIN = 0.05  # seconds past BUSY_WAKE_INTERVAL for the one early claim: the applications' clocks run apart
SAY_IDLE = text("SELECT fp_outbox_listening(CAST(:seconds AS float8))")


class IdleFlag:
    """What this worker last said of its idling, and saying it again when a wait would outlast it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._until = 0.0  # monotonic time until which this worker last said it listens
        self._recheck_at: float | None = None  # monotonic time of the one early claim after saying it anew

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
        if self._until <= now:  # not listening until now: applications may have found every worker busy
            self._recheck_at = time.monotonic() + BUSY_WAKE_INTERVAL + RECHECK_MARGIN
        self._until = now + span
        return True

    def next_wait(self, poll: float) -> float:
        """How long the idle wait may last: `poll`, or, once after saying it anew, until the early claim is due."""
        if self._recheck_at is None:
            return poll
        left, self._recheck_at = self._recheck_at - time.monotonic(), None
        return max(0.0, min(poll, left))
