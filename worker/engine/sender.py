"""Sending one claimed event to /track over a keep-alive connection, with quick in-process retries."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable

import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt, wait_exponential_jitter

from outbox import __version__
from worker.engine.payload import Unsendable
from worker.engine.policy import Dead, Outcome, Retry, classify_exception, classify_response, redact
from worker.engine.settings import INLINE_WAIT_CAP, Settings
from worker.engine.store import Claimed, DatabaseUnavailable



class Sender:
    """Thread-safe: each sending thread keeps its own requests.Session (and so its own connection)."""

    def __init__(self, settings: Settings, take_permit: Callable[[int], None]) -> None:
        self._endpoint = settings.endpoint
        self._timeout = (settings.connect_timeout, settings.read_timeout)
        self._token = settings.token
        self._take_permit = take_permit
        self._local = threading.local()
        self._inline_wait = wait_exponential_jitter(initial=0.1, max=INLINE_WAIT_CAP)
        self._attempts = settings.inline_attempts
        self._template = requests.Request(
            "POST", settings.endpoint,
            headers={"Content-Type": "application/json", "User-Agent": f"fp-outbox/{__version__}"},
        ).prepare()
        self._proxies = requests.utils.get_environ_proxies(settings.endpoint)
        self._verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True

    def send(self, row: Claimed) -> Outcome:
        """Deliver one event; never raises: a failure of our own code dead-letters the event."""
        try:
            body = row.body(self._token)
        except Unsendable as exc:  # not an event, or no token anywhere: dead, with the reason
            return Dead(str(exc))
        try:
            outcome = self._retrying()(self._post_once, body)
        except DatabaseUnavailable as exc:  # no permit for a re-send: try again later, not now
            outcome = Retry(f"rate limiter unreachable: {exc}")
        except Exception as exc:  # poison must not take the worker down or spin
            outcome = classify_exception(exc)
        if isinstance(outcome, Retry | Dead):
            return dataclasses.replace(outcome, reason=redact(outcome.reason, self._secrets(row)))
        return outcome

    def _retrying(self) -> Retrying:
        return Retrying(
            stop=stop_after_attempt(self._attempts),
            wait=self._wait,
            retry=retry_if_result(_worth_retrying_now),
            before=self._before_attempt,
            retry_error_callback=lambda state: state.outcome.result(),
            reraise=True,
        )

    def _post_once(self, body: bytes) -> Outcome:
        try:
            request = self._template.copy()  # URL, headers and method prepared once, at start
            request.prepare_body(data=body, files=None)
            response = self._session().send(request, timeout=self._timeout, allow_redirects=False)
        except requests.RequestException as exc:
            return classify_exception(exc)
        return classify_response(response.status_code, response.headers, response.text)

    def _wait(self, state: RetryCallState) -> float:
        wait = self._inline_wait(state)
        outcome = state.outcome.result() if state.outcome else None
        if isinstance(outcome, Retry) and outcome.retry_after:
            wait = max(wait, outcome.retry_after)
        return wait

    def _before_attempt(self, state: RetryCallState) -> None:
        # The first try was paid for by the batch; every re-send counts against the global cap too.
        if state.attempt_number > 1:
            self._take_permit(1)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Proxy and CA settings from the environment are read once here, not on every request.
            session.trust_env = False
            session.proxies = self._proxies
            session.verify = self._verify
            session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0))
            session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0))
            self._local.session = session
        return session

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
