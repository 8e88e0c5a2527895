"""The retry policy (pure, no I/O): what each HTTP answer or error means, Retry-After, backoff, redaction."""

from __future__ import annotations

import email.utils
import json
import random
from datetime import timedelta

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from worker.engine.policy import (
    EXCERPT_CHARS,
    Backoff,
    Dead,
    Delivered,
    Retry,
    classify_exception,
    classify_response,
    excerpt_of,
    parse_retry_after,
    redact,
)

NOW = 1_700_000_000.0  # a fixed clock for HTTP-date Retry-After


# ---------------------------------------------------------------- responses

@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status):
    assert classify_response(status, {}, "ok") == Delivered(status)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599, 301, 302, 307, 308])
def test_transient_answers_are_retried(status):
    outcome = classify_response(status, {}, "try later", now=NOW)
    assert isinstance(outcome, Retry)
    assert outcome.status == status
    assert str(status) in outcome.reason
    assert outcome.retry_after is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 413, 415, 422, 451])
def test_other_4xx_are_dead_with_status_and_excerpt(status):
    outcome = classify_response(status, {}, '{"error": "bad token"}', now=NOW)
    assert isinstance(outcome, Dead)
    assert outcome.status == status
    assert str(status) in outcome.reason
    assert '{"error": "bad token"}' in outcome.reason


def test_retry_after_on_4xx_does_not_make_it_retryable():
    assert isinstance(classify_response(400, {"Retry-After": "5"}, "bad", now=NOW), Dead)


def test_long_body_is_cut_to_excerpt_chars():
    body = "<html>" + "x" * 10_000 + "</html>"
    outcome = classify_response(400, {}, body, now=NOW)
    assert isinstance(outcome, Dead)
    excerpt = outcome.reason.removeprefix("HTTP 400: ")
    assert len(excerpt) == EXCERPT_CHARS
    assert excerpt.startswith("<html>xxx")
    assert len(outcome.reason) <= len("HTTP 400: ") + EXCERPT_CHARS


def test_short_body_is_kept_whole_and_whitespace_folded():
    assert excerpt_of("line one\n\n   line two\t") == "line one line two"
    assert excerpt_of("x" * EXCERPT_CHARS) == "x" * EXCERPT_CHARS
    assert len(excerpt_of("x" * (EXCERPT_CHARS + 1))) == EXCERPT_CHARS


def test_empty_body_still_names_the_status():
    outcome = classify_response(404, {}, "", now=NOW)
    assert outcome == Dead("HTTP 404", 404)
    retry = classify_response(503, None, "", now=NOW)
    assert isinstance(retry, Retry) and retry.reason == "HTTP 503"


# ---------------------------------------------------------------- Retry-After

HTTP_DATE_IN_120_S = email.utils.formatdate(NOW + 120, usegmt=True)
HTTP_DATE_IN_PAST = email.utils.formatdate(NOW - 3600, usegmt=True)

RETRY_AFTER = [
    ("seconds", "120", 120.0),
    ("zero seconds", "0", 0.0),
    ("seconds with spaces", " 30 ", 30.0),
    ("HTTP date", HTTP_DATE_IN_120_S, 120.0),
    ("HTTP date in the past", HTTP_DATE_IN_PAST, 0.0),
    ("absent", None, None),
    ("empty", "", None),
    ("words", "soon", None),
    ("negative", "-5", None),
    ("fraction", "1.5", None),
    ("date without a zone", "Wed, 21 Oct 2015 07:28:00", None),
    ("garbage date", "Wed, 99 Foo 2015 07:28:00 GMT", None),
]


@pytest.mark.parametrize("value, expected", [c[1:] for c in RETRY_AFTER], ids=[c[0] for c in RETRY_AFTER])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_carried_uncapped_on_the_outcome(status):
    outcome = classify_response(status, {"Retry-After": "86400"}, "slow down", now=NOW)
    assert outcome == Retry(f"HTTP {status}: slow down", status, 86400.0)


def test_retry_after_as_http_date_on_the_outcome():
    outcome = classify_response(429, {"Retry-After": HTTP_DATE_IN_120_S}, "", now=NOW)
    assert isinstance(outcome, Retry) and outcome.retry_after == 120.0


def test_retry_after_header_lookup_ignores_case_as_requests_gives_it():
    headers = CaseInsensitiveDict({"retry-after": "7"})
    assert classify_response(429, headers, "", now=NOW).retry_after == 7.0


def test_unreadable_retry_after_means_none():
    assert classify_response(503, {"Retry-After": "whenever"}, "", now=NOW).retry_after is None


def test_classify_a_real_requests_response():
    response = requests.models.Response()
    response.status_code = 429
    response.headers = CaseInsensitiveDict({"Retry-After": "3"})
    response._content = b"rate limited"
    outcome = classify_response(response.status_code, response.headers, response.text, now=NOW)
    assert outcome == Retry("HTTP 429: rate limited", 429, 3.0)


# ---------------------------------------------------------------- exceptions

EXCEPTIONS = [
    ("connection error", requests.exceptions.ConnectionError("Connection refused"), "connection"),
    ("connect timeout", requests.exceptions.ConnectTimeout("timed out"), "connect timeout"),
    ("read timeout", requests.exceptions.ReadTimeout("read timed out"), "read timeout"),
    ("chunked encoding", requests.exceptions.ChunkedEncodingError("reset"), "connection"),
    ("ssl error", requests.exceptions.SSLError("handshake"), "connection"),
]


@pytest.mark.parametrize("exc, fragment", [c[1:] for c in EXCEPTIONS], ids=[c[0] for c in EXCEPTIONS])
def test_transport_errors_are_retried(exc, fragment):
    outcome = classify_exception(exc)
    assert isinstance(outcome, Retry)
    assert fragment in outcome.reason
    assert outcome.status is None and outcome.retry_after is None


@pytest.mark.parametrize("exc", [ValueError("boom"), TypeError("not str"), KeyError("x")],
                         ids=["ValueError", "TypeError", "KeyError"])
def test_other_exceptions_are_dead_worker_errors(exc):
    outcome = classify_exception(exc)
    assert isinstance(outcome, Dead)
    assert outcome.reason.startswith("worker error")
    assert type(exc).__name__ in outcome.reason


def test_exception_reason_is_one_short_line():
    outcome = classify_exception(requests.exceptions.ConnectionError("first line\nsecond " + "y" * 1000))
    assert "\n" not in outcome.reason and "second" not in outcome.reason
    long = classify_exception(requests.exceptions.ConnectionError("z" * 1000))
    assert len(long.reason) <= len("connection error: ") + EXCERPT_CHARS


def test_exception_without_message_names_its_class():
    assert "ValueError" in classify_exception(ValueError()).reason


def test_outcomes_are_frozen_values():
    outcome = Retry("x")
    with pytest.raises(AttributeError):
        outcome.reason = "y"  # type: ignore[misc]
    assert Dead("r", 400) == Dead("r", 400)


# ---------------------------------------------------------------- backoff

POLICY = Backoff(max_attempts=10, base=timedelta(seconds=2), cap=timedelta(seconds=60),
                 retry_after_cap=timedelta(seconds=30))

CEILINGS = [(0, 2), (1, 2), (2, 4), (3, 8), (4, 16), (5, 32), (6, 60), (7, 60), (20, 60), (60, 60)]


@pytest.mark.parametrize("attempts, ceiling", CEILINGS)
@pytest.mark.parametrize("seed", range(5))
def test_delay_lies_between_half_ceiling_and_ceiling(attempts, ceiling, seed):
    delay = POLICY.delay(attempts, rng=random.Random(seed))
    assert ceiling / 2 <= delay <= ceiling


def test_delay_grows_exponentially_from_base():
    class Top(random.Random):
        def random(self) -> float:
            return 1.0

    ceilings = [POLICY.delay(n, rng=Top()) for n in range(1, 8)]
    assert ceilings == [2, 4, 8, 16, 32, 60, 60]


def test_delay_is_jittered_and_seed_reproducible():
    delays = {POLICY.delay(4, rng=random.Random(seed)) for seed in range(20)}
    assert len(delays) > 10
    assert POLICY.delay(4, rng=random.Random(7)) == POLICY.delay(4, rng=random.Random(7))


def test_default_policy():
    policy = Backoff()
    assert policy.max_attempts == 25
    assert 0.5 <= policy.delay(1, rng=random.Random(0)) <= 1.0
    assert policy.delay(25, rng=random.Random(0)) <= 3600


def test_delay_stays_capped_for_very_many_attempts():
    policy = Backoff(max_attempts=5000, cap=timedelta(hours=1))
    for attempts in (1025, 2000, 10**6):
        assert 1800 <= policy.delay(attempts, rng=random.Random(0)) <= 3600


RETRY_AFTERS = [
    # (attempts, retry_after, lower bound, upper bound)
    ("minimum over jitter", 1, 20.0, 20.0, 20.0),
    ("jitter over small retry_after", 6, 1.0, 30.0, 60.0),
    ("capped at retry_after_cap", 1, 3600.0, 30.0, 30.0),
    ("zero retry_after", 1, 0.0, 1.0, 2.0),
]


@pytest.mark.parametrize("attempts, retry_after, low, high", [c[1:] for c in RETRY_AFTERS],
                         ids=[c[0] for c in RETRY_AFTERS])
@pytest.mark.parametrize("seed", range(5))
def test_retry_after_is_a_capped_minimum(attempts, retry_after, low, high, seed):
    delay = POLICY.delay(attempts, retry_after=retry_after, rng=random.Random(seed))
    assert low <= delay <= high


def test_exhausted():
    assert [POLICY.exhausted(n) for n in (0, 1, 9, 10, 11)] == [False, False, False, True, True]
    assert Backoff(max_attempts=1).exhausted(1)


# ---------------------------------------------------------------- redaction

REDACTIONS = [
    ("token in body", "echo: token=tok-secret-1 ok", ("tok-secret-1",), "echo: token=[token] ok"),
    ("twice", "tok-a tok-a", ("tok-a",), "[token] [token]"),
    ("two secrets", "a=tok-a b=tok-b", ("tok-a", "tok-b"), "a=[token] b=[token]"),
    ("no secret present", "nothing here", ("tok-a",), "nothing here"),
    ("empty secret ignored", "abc", ("",), "abc"),
    ("None secret ignored", "abc", (None,), "abc"),
    ("no secrets", "abc tok", (), "abc tok"),
]


@pytest.mark.parametrize("text, secrets, expected", [c[1:] for c in REDACTIONS], ids=[c[0] for c in REDACTIONS])
def test_redact(text, secrets, expected):
    assert redact(text, secrets) == expected


def test_redacted_reason_from_an_echoing_error_page():
    outcome = classify_response(401, {}, '{"error": "unknown token tok-3f9a"}', now=NOW)
    assert "tok-3f9a" not in redact(outcome.reason, ("tok-3f9a",))


# ---------------------------------------------------------------- hostile answers (issue 9)

STRICT_RETRY_AFTER = [
    ("superscript two", "²", None),
    ("fullwidth digits", "１２", None),
    ("arabic-indic digit", "٣", None),
    ("exponent", "1e3", None),
    ("plus sign", "+5", None),
    ("a date with non-ASCII digits", "Wed, ２1 Oct 2015 07:28:00 GMT", None),
    ("a number too large for a float", "9" * 400, 1e9),
    ("tabs around seconds", "\t7\t", 7.0),
]


@pytest.mark.parametrize("value, expected", [c[1:] for c in STRICT_RETRY_AFTER], ids=[c[0] for c in STRICT_RETRY_AFTER])
def test_retry_after_is_ascii_digits_or_an_http_date_and_nothing_else(value, expected):
    assert parse_retry_after(value, now=NOW) == expected


def test_a_503_with_an_unreadable_retry_after_is_still_retried():
    assert classify_response(503, {"Retry-After": "²"}, "busy", now=NOW) == Retry("HTTP 503: busy", 503, None)


STORABLE = [
    ("raw NUL byte", b"bad\x00request", "bad\\0request"),
    ("NUL character", "bad\x00request", "bad\\0request"),
    ("lone surrogate", "bad\ud800request", "bad\ufffdrequest"),
    ("invalid UTF-8", b"bad\xff\xferequest", "bad\ufffd\ufffdrequest"),
    ("control characters", "a\x01b\x7fc", "a b c"),
]


@pytest.mark.parametrize("body, expected", [c[1:] for c in STORABLE], ids=[c[0] for c in STORABLE])
def test_the_excerpt_is_always_storable_text(body, expected):
    outcome = classify_response(400, {}, body, now=NOW)
    assert outcome == Dead(f"HTTP 400: {expected}", 400)
    assert "\x00" not in outcome.reason
    outcome.reason.encode("utf-8")  # no lone surrogate: PostgreSQL text accepts it


SECRET = "tok-3f9a1c0d-test"
JSON_ECHOES = [
    ("raw", SECRET),
    ("hyphens as \\u002d", SECRET.replace("-", "\\u002d")),
    ("hyphens as \\u002D", SECRET.replace("-", "\\u002D")),
    ("every character escaped", "".join(f"\\u{ord(c):04x}" for c in SECRET)),
    ("json.dumps of the token", json.dumps(SECRET)[1:-1]),
]


@pytest.mark.parametrize("echo", [c[1] for c in JSON_ECHOES], ids=[c[0] for c in JSON_ECHOES])
def test_a_token_echoed_in_any_json_escaping_is_redacted(echo):
    outcome = classify_response(401, {}, '{"error": "unknown token ' + echo + '"}', now=NOW, secrets=(SECRET,))
    assert outcome == Dead('HTTP 401: {"error": "unknown token [token]"}', 401)


def test_a_non_ascii_token_escaped_as_json_is_redacted():
    secret = "tök-☃-😀"
    for echo in (json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
        assert redact(f"echo {echo} end", (secret,)) == "echo [token] end"


@pytest.mark.parametrize("offset", range(EXCERPT_CHARS - len(SECRET) - 5, EXCERPT_CHARS + 5))
def test_the_token_is_redacted_before_the_excerpt_is_cut(offset):
    outcome = classify_response(400, {}, "x" * offset + SECRET + " tail", now=NOW, secrets=(SECRET,))
    for length in range(4, len(SECRET) + 1):
        assert SECRET[:length] not in outcome.reason, (offset, outcome.reason[-30:])


def test_a_token_cut_by_the_read_limit_is_not_half_shown():
    body = ("x" * 100 + SECRET).encode()
    for cut in range(100, len(body)):  # the answer was longer than what was read: the last bytes are suspect
        outcome = classify_response(400, {}, body[:cut], now=NOW, secrets=(SECRET,), truncated=True)
        assert not any(SECRET[:n] in outcome.reason for n in range(4, len(SECRET) + 1)), cut


# What one send says of the endpoint itself (worker.engine.endpoint counts the failures toward an outage).
ENDPOINT_SIGNALS = [
    ("2xx: it answered", Delivered(200), False),
    ("a 4xx about the event: it answered", Dead("HTTP 400: bad", 400), False),
    ("429: it answered, throttling", Retry("HTTP 429", 429, 1.0), False),
    ("5xx", Retry("HTTP 503", 503), True),
    ("500", Retry("HTTP 500", 500), True),
    ("408", Retry("HTTP 408", 408), True),
    ("no connection", Retry("connection error: refused"), True),
    ("no answer in time", Retry("read timeout: no answer in time"), True),
    ("cut at the request's deadline", Retry("deadline: no complete answer"), True),
    ("a redirect: the endpoint's configuration, not its health", Retry("HTTP 301", 301), None),
    ("not sent at all", Retry("not sent: the endpoint is down", sent=False), None),
    ("an event the worker could not build", Dead("malformed payload: not an object"), None),
]


@pytest.mark.parametrize("outcome, expected", [c[1:] for c in ENDPOINT_SIGNALS], ids=[c[0] for c in ENDPOINT_SIGNALS])
def test_what_a_send_says_of_the_endpoint(outcome, expected):
    from worker.engine.policy import endpoint_failed

    assert endpoint_failed(outcome) is expected
