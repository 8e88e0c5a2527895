"""The retry policy in one place: what an HTTP answer or error means, and when to try again.

| outcome                                   | action                                             |
| ----------------------------------------- | -------------------------------------------------- |
| 2xx                                       | delivered                                          |
| connection error, timeout, 408, 429, 5xx  | retry (in process briefly, then durably in the row)|
| 3xx                                       | retry: the endpoint is misconfigured, not the event|
| any other 4xx                             | dead at once, with the status and an excerpt       |
| attempts exhausted                        | dead, with the last error                          |
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from datetime import timedelta

import requests

EXCERPT_CHARS = 200


@dataclass(frozen=True)
class Delivered:
    status: int


@dataclass(frozen=True)
class Retry:
    reason: str
    status: int | None = None
    retry_after: float | None = None  # seconds the endpoint asked us to wait, uncapped


@dataclass(frozen=True)
class Dead:
    reason: str
    status: int | None = None


Outcome = Delivered | Retry | Dead


def classify_response(status: int, headers: dict[str, str] | None, body: str, now: float | None = None) -> Outcome:
    """What an HTTP answer means for the event that was sent."""
    if 200 <= status < 300:
        return Delivered(status)
    excerpt = f"HTTP {status}: {excerpt_of(body)}".rstrip(": ")
    if status in (408, 429) or status >= 500 or 300 <= status < 400:
        after = parse_retry_after((headers or {}).get("Retry-After"), now)
        return Retry(excerpt, status, after)
    return Dead(excerpt, status)


def classify_exception(exc: BaseException) -> Outcome:
    """What a failure to get an answer means: the server may or may not have seen it, so retry."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return Retry(f"connect timeout: {exc.__class__.__name__}")
    if isinstance(exc, requests.exceptions.Timeout):
        # It may have arrived; the re-send carries the same $insert_id, so the destination dedupes.
        return Retry("read timeout: no answer in time")
    if isinstance(exc, requests.exceptions.RequestException):
        return Retry(f"connection error: {_first_line(exc)}")
    return Dead(f"worker error: {exc.__class__.__name__}: {_first_line(exc)}")


def excerpt_of(body: str) -> str:
    text = " ".join(body.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class Backoff:
    """The durable schedule: capped exponential backoff with jitter, from the stored attempt count."""

    max_attempts: int = 25
    base: timedelta = timedelta(seconds=1)
    cap: timedelta = timedelta(hours=1)
    retry_after_cap: timedelta = timedelta(minutes=10)

    def delay(self, attempts: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds until the next attempt after `attempts` failed ones; Retry-After is a (capped) minimum."""
        ceiling = min(self.cap.total_seconds(), self.base.total_seconds() * 2 ** min(max(0, attempts - 1), 64))
        jittered = ceiling * (0.5 + 0.5 * (rng or random).random())  # "equal jitter": never under half
        if retry_after is not None:
            jittered = max(jittered, min(retry_after, self.retry_after_cap.total_seconds()))
        return jittered

    def exhausted(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Remove tokens from anything we record or log (an error page may echo the request)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[token]")
    return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return excerpt_of(text[0]) if text else exc.__class__.__name__
