"""Sending one claimed event to /track: the first attempt straight on the transport, and only after a failure
worth retrying at once, tenacity for the in-process re-sends. Every request is written within its slice of the
shared rate budget (one that cannot start by the slice's end takes a new slice), fits inside the row's lease
(its total deadline included), and is written only while the worker still holds the row (the gate, which a
stop closes); otherwise the row goes back with the last outcome, for a later retry."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt, wait_exponential, wait_random

from outbox import __version__
from worker.engine.inflight import Gate
from worker.engine.payload import Unsendable
from worker.engine.policy import Dead, Outcome, Retry, classify_exception, classify_response, redact
from worker.engine.settings import INLINE_WAIT_CAP, LEASE_MARGIN, Settings
from worker.engine.store import Claimed, DatabaseUnavailable
from worker.engine.transport import Answer, NotSent, Transport

NO_ROOM = "not sent: what is left of the lease cannot hold a whole request; retried later"
ENDPOINT_DOWN = "not sent: the endpoint is down (an outage); sent once a probe gets an answer"
NO_SLICE = "not sent: the shared rate budget could not be read; retried later"
# Seconds a request may start after its rate slice ended, as the worker saw the slice. Requests that start
# within [slice start, slice end + t] put at most rate x (1 + w + t) + 2 chunks in any window of w = 1 s,
# rate being 96 % of the limit (worker.engine.permits.RATE_HEADROOM) and a chunk 1/200 of it: 20 ms leaves
# 11 ms for what follows the check (the write, the receiver's own scheduling) within the limit.
SLICE_TOLERANCE = 0.02


class GiveBack(Exception):
    """Stop sending this row now (the worker let it go, or the lease has no room left for another try)."""


class Late(NotSent):
    """The request could not start within its rate slice (a busy host woke its thread late): it takes a new one."""


class Sender:
    """Thread-safe. `take_permit(count, max_wait)` reserves shared rate budget for one more request and waits for
    its slice to start, unless that is more than `max_wait` seconds away: it returns the slice's end
    (time.monotonic()), or None. `endpoint` (worker.engine.endpoint.Endpoint) says when the endpoint is down:
    then only the probe is sent, and nothing is re-sent in process."""

    def __init__(self, settings: Settings, take_permit: Callable[[int, float], float | None],
                 transport: Transport | None = None, endpoint=None) -> None:
        self.endpoint = endpoint
        self._token = settings.token
        self.take_permit = take_permit
        self.request_deadline = settings.request_deadline
        # 0.1 s, 0.2 s, 0.4 s ... plus up to 0.1 s of jitter, never over INLINE_WAIT_CAP (the lease counts on it).
        self._inline_wait = wait_exponential(multiplier=0.1, max=INLINE_WAIT_CAP - 0.1) + wait_random(0, 0.1)
        self._attempts = settings.inline_attempts
        self.transport = transport or Transport(settings.endpoint, settings.connect_timeout, settings.read_timeout,
                                                settings.concurrency, f"fp-outbox/{__version__}")

    def send(self, row: Claimed, lease_ends: float, gate: Gate, slice_ends: float) -> Outcome | None:
        """Deliver one event before `lease_ends`, its first request starting by `slice_ends` (time.monotonic());
        never raises (a failure of our own code dead-letters the event). None if no request was made because
        the worker let the row go."""
        try:
            body = row.body(self._token)
        except Unsendable as exc:  # not an event, or no token anywhere: dead, with the reason
            return Dead(str(exc))
        sending = _Sending(self, row, body, lease_ends, gate, slice_ends)
        try:
            outcome = sending.attempt()
        except GiveBack as stop:
            return None if not gate.is_open() else Retry(str(stop), sent=False)
        except Exception as exc:  # poison must not take the worker down or spin
            outcome = classify_exception(exc)
        if _worth_retrying_now(outcome) and self._attempts > 1:
            outcome = self._resend(sending, outcome)
        if isinstance(outcome, Retry | Dead):
            return dataclasses.replace(outcome, reason=redact(outcome.reason, self.secrets(row)))
        return outcome

    def outcome_of(self, answer: Answer, row: Claimed) -> Outcome:
        if 200 <= answer.status < 300:
            return classify_response(answer.status, None, b"")
        return classify_response(answer.status, {"Retry-After": answer.retry_after}, answer.head,
                                 secrets=self.secrets(row), truncated=answer.truncated)

    def _resend(self, sending: _Sending, first: Outcome) -> Outcome:
        """The in-process re-sends, driven by tenacity: its first 'attempt' is the one already made."""
        replay, made = [first], [first]

        def attempt() -> Outcome:
            if replay:
                return replay.pop()
            made.append(sending.attempt())
            return made[-1]

        def before(state: RetryCallState) -> None:
            # The first try's slice came with the claim; every re-send takes one of its own.
            if state.attempt_number > 1:
                if self.endpoint is not None and self.endpoint.down:
                    raise GiveBack(ENDPOINT_DOWN)
                sending.slice_ends = sending.new_slice()

        retrying = Retrying(stop=stop_after_attempt(self._attempts), wait=self._wait,
                            retry=retry_if_result(_worth_retrying_now), before=before,
                            retry_error_callback=lambda state: state.outcome.result(), reraise=True)
        try:
            return retrying(attempt)
        except (GiveBack, DatabaseUnavailable):
            return made[-1]  # the last answer stands; the row is settled for a later retry

    def _wait(self, state: RetryCallState) -> float:
        wait = self._inline_wait(state)
        outcome = state.outcome.result() if state.outcome else None
        if isinstance(outcome, Retry) and outcome.retry_after:
            wait = max(wait, outcome.retry_after)
        return wait

    def secrets(self, row: Claimed) -> tuple[str, ...]:
        try:
            own = json.loads(row.payload).get("properties", {}).get("token")
        except (ValueError, AttributeError):
            own = None
        return tuple(t for t in (self._token, own) if isinstance(t, str) and t)


class _Sending:
    """One row's sending: its body, its lease, the gate it must pass, and the rate slice of its next request."""

    def __init__(self, sender: Sender, row: Claimed, body: bytes, lease_ends: float, gate: Gate,
                 slice_ends: float) -> None:
        self._sender, self._row, self._body = sender, row, body
        self._lease_ends, self._gate = lease_ends, gate
        self.slice_ends = slice_ends

    def attempt(self) -> Outcome:
        """One request, if the lease has room for its whole deadline and the row is still ours; written within
        its rate slice, or in a new one."""
        while True:
            deadline = time.monotonic() + self._sender.request_deadline
            if deadline > self._lease_ends - LEASE_MARGIN:
                raise GiveBack(NO_ROOM)
            if not self._gate.is_open():  # no need to connect: writing() would refuse
                raise GiveBack("not sent: the worker is stopping and released the row")
            if self._sender.endpoint is not None and self._sender.endpoint.holds(self._row.id):
                raise GiveBack(ENDPOINT_DOWN)
            try:
                answer = self._sender.transport.post(self._body, deadline, self._writing)
            except Late:
                self.slice_ends = self.new_slice()
                continue
            except NotSent as exc:
                raise GiveBack(str(exc)) from None
            except Exception as exc:
                return classify_exception(exc)
            return self._sender.outcome_of(answer, self._row)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Entered just before the request's first byte is written (worker.engine.transport)."""
        if time.monotonic() > self.slice_ends + SLICE_TOLERANCE:
            raise Late("the request could not start within its rate slice")
        with self._gate.writing(self._row.id):
            yield

    def new_slice(self) -> float:
        """A slice of the shared rate budget for the next request, waited for until it starts; GiveBack if the
        lease could not hold the wait and a whole request after it."""
        room = self._lease_ends - LEASE_MARGIN - self._sender.request_deadline - time.monotonic()
        try:
            ends = self._sender.take_permit(1, room) if room >= 0 else None
        except DatabaseUnavailable:
            raise GiveBack(NO_SLICE) from None
        if ends is None:
            raise GiveBack(NO_ROOM)
        return ends


def _worth_retrying_now(outcome: Outcome) -> bool:
    """Retry in process only what a short wait may fix; 429 and long Retry-After go back to the row
    (and a 429 pauses every worker), so no thread sits out a long wait."""
    if not isinstance(outcome, Retry) or outcome.status == 429:
        return False
    return outcome.retry_after is None or outcome.retry_after <= INLINE_WAIT_CAP
