"""Sending one claimed event to /track: the first attempt straight on the transport, and only after a failure
worth retrying at once, tenacity for the in-process re-sends. Every attempt fits inside the row's lease (its
total deadline included) and starts only while the worker still holds the row; otherwise the row goes back
with the last outcome, for a later retry."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt, wait_exponential, wait_random

from outbox import __version__
from worker.engine.payload import Unsendable
from worker.engine.policy import Dead, Outcome, Retry, classify_exception, classify_response, redact
from worker.engine.settings import INLINE_WAIT_CAP, LEASE_MARGIN, Settings
from worker.engine.store import Claimed, DatabaseUnavailable
from worker.engine.transport import Transport

NO_ROOM = "not sent: what is left of the lease cannot hold a whole request; retried later"
ENDPOINT_DOWN = "not sent: the endpoint is down (an outage); sent once a probe gets an answer"


class GiveBack(Exception):
    """Stop sending this row now (the worker let it go, or the lease has no room left for another try)."""


class Sender:
    """Thread-safe. `take_permit(count, max_wait)` reserves shared rate budget for a re-send and says whether it
    came within `max_wait` seconds (it sleeps until then). `endpoint` (worker.engine.endpoint.Endpoint) says
    when the endpoint is down: then only the probe is sent, and nothing is re-sent in process."""

    def __init__(self, settings: Settings, take_permit: Callable[[int, float], bool],
                 transport: Transport | None = None, endpoint=None) -> None:
        self._endpoint = endpoint
        self._token = settings.token
        self._take_permit = take_permit
        self._request_deadline = settings.request_deadline
        # 0.1 s, 0.2 s, 0.4 s ... plus up to 0.1 s of jitter, never over INLINE_WAIT_CAP (the lease counts on it).
        self._inline_wait = wait_exponential(multiplier=0.1, max=INLINE_WAIT_CAP - 0.1) + wait_random(0, 0.1)
        self._attempts = settings.inline_attempts
        self._transport = transport or Transport(settings.endpoint, settings.connect_timeout, settings.read_timeout,
                                                 settings.concurrency, f"fp-outbox/{__version__}")

    def send(self, row: Claimed, lease_ends: float, may_start: Callable[[], bool]) -> Outcome | None:
        """Deliver one event before `lease_ends` (time.monotonic()); never raises (a failure of our own code
        dead-letters the event). None if no request was started because the worker let the row go."""
        try:
            body = row.body(self._token)
        except Unsendable as exc:  # not an event, or no token anywhere: dead, with the reason
            return Dead(str(exc))
        try:
            outcome = self._attempt(body, lease_ends, may_start, row)
        except GiveBack as stop:
            return None if not may_start() else Retry(str(stop), sent=False)
        except Exception as exc:  # poison must not take the worker down or spin
            outcome = classify_exception(exc)
        if _worth_retrying_now(outcome) and self._attempts > 1:
            outcome = self._resend(body, outcome, lease_ends, may_start, row)
        if isinstance(outcome, Retry | Dead):
            return dataclasses.replace(outcome, reason=redact(outcome.reason, self._secrets(row)))
        return outcome

    def _attempt(self, body: bytes, lease_ends: float, may_start: Callable[[], bool], row: Claimed) -> Outcome:
        """One request, if the lease has room for its whole deadline and the row is still ours."""
        deadline = time.monotonic() + self._request_deadline
        if deadline > lease_ends - LEASE_MARGIN:
            raise GiveBack(NO_ROOM)
        if not may_start():
            raise GiveBack("not sent: the worker is stopping and released the row")
        if self._endpoint is not None and self._endpoint.holds(row.id):
            raise GiveBack(ENDPOINT_DOWN)
        try:
            answer = self._transport.post(body, deadline)
        except Exception as exc:
            return classify_exception(exc)
        if 200 <= answer.status < 300:
            return classify_response(answer.status, None, b"")
        return classify_response(answer.status, {"Retry-After": answer.retry_after}, answer.head,
                                 secrets=self._secrets(row), truncated=answer.truncated)

    def _resend(self, body: bytes, first: Outcome, lease_ends: float, may_start, row: Claimed) -> Outcome:
        """The in-process re-sends, driven by tenacity: its first 'attempt' is the one already made."""
        replay, made = [first], [first]

        def attempt() -> Outcome:
            if replay:
                return replay.pop()
            made.append(self._attempt(body, lease_ends, may_start, row))
            return made[-1]

        retrying = Retrying(stop=stop_after_attempt(self._attempts), wait=self._wait,
                            retry=retry_if_result(_worth_retrying_now), before=self._before(lease_ends),
                            retry_error_callback=lambda state: state.outcome.result(), reraise=True)
        try:
            return retrying(attempt)
        except (GiveBack, DatabaseUnavailable):
            return made[-1]  # the last answer stands; the row is settled for a later retry

    def _before(self, lease_ends: float) -> Callable[[RetryCallState], None]:
        def before(state: RetryCallState) -> None:
            # The first try was paid for by the claim; every re-send counts against the global cap too, and
            # may wait for it only as long as the lease still holds a whole request after the wait.
            if state.attempt_number > 1:
                if self._endpoint is not None and self._endpoint.down:
                    raise GiveBack(ENDPOINT_DOWN)
                room = lease_ends - LEASE_MARGIN - self._request_deadline - time.monotonic()
                if room < 0 or not self._take_permit(1, room):
                    raise GiveBack(NO_ROOM)
        return before

    def _wait(self, state: RetryCallState) -> float:
        wait = self._inline_wait(state)
        outcome = state.outcome.result() if state.outcome else None
        if isinstance(outcome, Retry) and outcome.retry_after:
            wait = max(wait, outcome.retry_after)
        return wait

    def _secrets(self, row: Claimed) -> tuple[str, ...]:
        try:
            own = json.loads(row.payload).get("properties", {}).get("token")
        except (ValueError, AttributeError):
            own = None
        return tuple(t for t in (self._token, own) if isinstance(t, str) and t)


def _worth_retrying_now(outcome: Outcome) -> bool:
    """Retry in process only what a short wait may fix; 429 and long Retry-After go back to the row
    (and a 429 pauses every worker), so no thread sits out a long wait."""
    if not isinstance(outcome, Retry) or outcome.status == 429:
        return False
    return outcome.retry_after is None or outcome.retry_after <= INLINE_WAIT_CAP
