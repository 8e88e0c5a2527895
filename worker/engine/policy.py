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
import functools
import random
import re
import time
from dataclasses import dataclass
from datetime import timedelta

import requests
import urllib3.exceptions

EXCERPT_CHARS = 200
RETRY_AFTER_MAX = 1e9  # seconds; any longer is as good as never, and a float that large still sleeps finitely
_SECONDS = re.compile(r"[0-9]+", re.ASCII)
_UNPRINTABLE = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                  "\t": "\\t"}


@dataclass(frozen=True)
class Delivered:
    status: int


@dataclass(frozen=True)
class Retry:
    reason: str
    status: int | None = None
    retry_after: float | None = None  # seconds the endpoint asked us to wait, uncapped
    sent: bool = True  # False: no request was made (the worker gave the row back before sending it)
    counted: bool = True  # False: made while the endpoint was down; the attempt is given back, no backoff


@dataclass(frozen=True)
class Dead:
    reason: str
    status: int | None = None


Outcome = Delivered | Retry | Dead


def endpoint_failed(outcome: Outcome) -> bool | None:
    """What one send says of the endpoint itself: True when it failed in a way no event causes (5xx, 408, no
    connection, no answer in time), False when it answered (2xx, 429, a 4xx about the event), None when it says
    nothing (not sent, a redirect, an event the worker could not build)."""
    if isinstance(outcome, Delivered):
        return False
    if isinstance(outcome, Dead):
        return False if outcome.status is not None else None
    if not outcome.sent or (outcome.status is not None and 300 <= outcome.status < 400):
        return None
    return outcome.status is None or outcome.status >= 500 or outcome.status == 408


class DeadlineExceeded(Exception):
    """A request ran past its total deadline (a trickling answer) and its connection was cut."""


def classify_response(status: int, headers, body: bytes | str, now: float | None = None,
                      secrets: tuple[str, ...] = (), truncated: bool = False) -> Outcome:
    """What an HTTP answer means for the event that was sent. `body` is what was read of the answer
    (`truncated`: there was more); the excerpt recorded from it never shows a token in `secrets`."""
    if 200 <= status < 300:
        return Delivered(status)
    excerpt = f"HTTP {status}: {excerpt_of(body, secrets, truncated)}".rstrip(": ")
    if status in (408, 429) or status >= 500 or 300 <= status < 400:
        after = parse_retry_after((headers or {}).get("Retry-After"), now)
        return Retry(excerpt, status, after)
    return Dead(excerpt, status)


def classify_exception(exc: BaseException) -> Outcome:
    """What a failure to get an answer means: the server may or may not have seen it, so retry."""
    if isinstance(exc, DeadlineExceeded):
        return Retry(f"deadline: {exc}")
    if isinstance(exc, urllib3.exceptions.NewConnectionError | urllib3.exceptions.NameResolutionError):
        return Retry(f"connection error: {_first_line(exc)}")
    if isinstance(exc, requests.exceptions.ConnectTimeout | urllib3.exceptions.ConnectTimeoutError):
        return Retry(f"connect timeout: {exc.__class__.__name__}")
    if isinstance(exc, requests.exceptions.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
        # It may have arrived; the re-send carries the same $insert_id, so the destination dedupes.
        return Retry("read timeout: no answer in time")
    if isinstance(exc, requests.exceptions.RequestException | urllib3.exceptions.HTTPError | OSError):
        return Retry(f"connection error: {_first_line(exc)}")
    return Dead(f"worker error: {exc.__class__.__name__}: {_first_line(exc)}")


def excerpt_of(body: bytes | str, secrets: tuple[str, ...] = (), truncated: bool = False) -> str:
    """A one-line excerpt of an answer that PostgreSQL can store and a log can show: tokens redacted first
    (raw or JSON-escaped), then NULs, lone surrogates and control characters replaced, then cut."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    longest = max((_longest_escaping(secret) for secret in secrets if secret), default=0)
    if truncated and longest:
        text = text[: max(0, len(text) - longest + 1)]  # what was read may end inside a token: drop that tail
    text = redact(text, secrets)
    text = without_surrogates(text.replace("\x00", "\\0"))
    text = " ".join(_UNPRINTABLE.sub(" ", text).split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def without_surrogates(text: str) -> str:
    """`text` with every surrogate code point (which UTF-8, and so PostgreSQL, cannot store) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: ASCII delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return min(float(value), RETRY_AFTER_MAX)
    if not value.isascii():
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
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
    """Remove tokens from anything we record or log (an error page may echo the request, JSON-escaped)."""
    for secret in secrets:
        if secret:
            text = _token_pattern(secret).sub("[token]", text)
    return text


@functools.lru_cache(maxsize=64)
def _token_pattern(secret: str) -> re.Pattern[str]:
    """The secret written raw or with any of its characters JSON-escaped (\\u002d, \\u002D, \\/ ...)."""
    return re.compile("".join(_escapings(char) for char in secret))


def _escapings(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:  # JSON writes it as a surrogate pair
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        forms = [re.escape(char), _hex_escape(high) + _hex_escape(low)]
    else:
        forms = [re.escape(char), _hex_escape(code)]
    if char in _SHORT_ESCAPES:
        forms.append(re.escape(_SHORT_ESCAPES[char]))
    return "(?:" + "|".join(forms) + ")"


def _hex_escape(code: int) -> str:
    return "\\\\u" + "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{code:04x}")


def _longest_escaping(secret: str) -> int:
    return sum(12 if ord(char) > 0xFFFF else 6 for char in secret)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return excerpt_of(text[0]) if text else exc.__class__.__name__
