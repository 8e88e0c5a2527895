"""Worker settings from flags and environment (pure), plus one real run of each CLI without a database URL."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from outbox.db import ConfigError
from worker.engine.settings import DEFAULT_ENDPOINT, build_parser, from_args

URL = "postgresql://app@127.0.0.1:5432/app"
ENV = {"FP_OUTBOX_DATABASE_URL": URL}
TOKEN = "tok-3f9a1c0d-settings-secret"
REPO = Path(__file__).resolve().parent.parent


def settings(*argv: str, environ: dict[str, str] | None = None):
    return from_args(build_parser().parse_args(list(argv)), environ=ENV if environ is None else environ)


def config_error(*argv: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        settings(*argv, environ=environ)
    return str(caught.value)


# ---------------------------------------------------------------- defaults and precedence

def test_defaults():
    s = settings()
    assert s.endpoint == DEFAULT_ENDPOINT == "https://api.perfalytics.com/track"
    assert s.token is None
    assert s.rate_limit == 5000
    assert s.drain is False
    assert isinstance(s.poll_interval, timedelta) and isinstance(s.startup_timeout, timedelta)
    assert s.database_url.drivername == "postgresql+psycopg"


def test_environment_is_read_only_from_the_given_mapping(monkeypatch):
    monkeypatch.setenv("FP_OUTBOX_RATE_LIMIT", "7")
    assert settings().rate_limit == 5000


PRECEDENCE = [
    # (flags, environment, attribute, expected)
    ("flag wins over env: endpoint", ["--endpoint", "http://flag.example/track"],
     {"FP_OUTBOX_ENDPOINT": "http://env.example/track"}, "endpoint", "http://flag.example/track"),
    ("env used without flag: endpoint", [], {"FP_OUTBOX_ENDPOINT": "http://env.example/track"},
     "endpoint", "http://env.example/track"),
    ("flag wins over env: token", ["--token", "flag-tok"], {"FP_OUTBOX_TOKEN": "env-tok"}, "token", "flag-tok"),
    ("env used without flag: token", [], {"FP_OUTBOX_TOKEN": "env-tok"}, "token", "env-tok"),
    ("flag wins over env: rate limit", ["--rate-limit", "10"], {"FP_OUTBOX_RATE_LIMIT": "20"}, "rate_limit", 10.0),
    ("env used without flag: rate limit", [], {"FP_OUTBOX_RATE_LIMIT": "20"}, "rate_limit", 20.0),
    ("empty env means default", [], {"FP_OUTBOX_RATE_LIMIT": ""}, "rate_limit", 5000.0),
    ("flag wins over env: concurrency", ["--concurrency", "4"], {"FP_OUTBOX_CONCURRENCY": "8"}, "concurrency", 4),
    ("drain flag", ["--drain"], {}, "drain", True),
    ("retain dead: default", [], {}, "retain_dead", timedelta(days=30)),
    ("retain dead: flag wins", ["--retain-dead", "2w"], {"FP_OUTBOX_RETAIN_DEAD": "1d"}, "retain_dead",
     timedelta(weeks=2)),
    ("retain dead: env", [], {"FP_OUTBOX_RETAIN_DEAD": "12h"}, "retain_dead", timedelta(hours=12)),
]


@pytest.mark.parametrize("argv, extra_env, attribute, expected", [c[1:] for c in PRECEDENCE],
                         ids=[c[0] for c in PRECEDENCE])
def test_flag_wins_over_environment(argv, extra_env, attribute, expected):
    value = getattr(settings(*argv, environ={**ENV, **extra_env}), attribute)
    assert value == expected
    assert type(value) is type(expected)


def test_durations_are_timedeltas_from_seconds():
    s = settings("--retry-base", "0.5", "--retry-cap", "90", "--retry-after-cap", "45", "--poll-interval", "2")
    assert s.backoff.base == timedelta(seconds=0.5)
    assert s.backoff.cap == timedelta(seconds=90)
    assert s.backoff.retry_after_cap == timedelta(seconds=45)
    assert s.poll_interval == timedelta(seconds=2)


def test_settings_are_frozen():
    s = settings()
    with pytest.raises(AttributeError):
        s.rate_limit = 1  # type: ignore[misc]


# ---------------------------------------------------------------- database URL

DATABASE_URLS = [
    ("flag over both variables", ["--database-url", "postgresql://flag@h/db"],
     {"FP_OUTBOX_DATABASE_URL": "postgresql://ours@h/db", "DATABASE_URL": "postgresql://app@h/db"}, "flag"),
    ("FP_OUTBOX_DATABASE_URL over DATABASE_URL", [],
     {"FP_OUTBOX_DATABASE_URL": "postgresql://ours@h/db", "DATABASE_URL": "postgresql://app@h/db"}, "ours"),
    ("DATABASE_URL alone", [], {"DATABASE_URL": "postgresql://app@h/db"}, "app"),
]


@pytest.mark.parametrize("argv, environ, user", [c[1:] for c in DATABASE_URLS], ids=[c[0] for c in DATABASE_URLS])
def test_database_url_precedence(argv, environ, user):
    assert settings(*argv, environ=environ).database_url.username == user


@pytest.mark.parametrize("environ", [{}, {"FP_OUTBOX_DATABASE_URL": ""}, {"DATABASE_URL": ""}],
                         ids=["nothing", "empty FP_OUTBOX_DATABASE_URL", "empty DATABASE_URL"])
def test_missing_database_url_names_flag_and_variable(environ):
    message = config_error(environ=environ)
    assert "--database-url" in message
    assert "FP_OUTBOX_DATABASE_URL" in message


DRIVERS = [
    ("postgresql://u@h:5432/db", "postgresql+psycopg"),
    ("postgres://u@h:5432/db", "postgresql+psycopg"),
    ("postgresql+psycopg://u@h:5432/db", "postgresql+psycopg"),
]


@pytest.mark.parametrize("raw, driver", DRIVERS, ids=[d[0].split(":")[0] for d in DRIVERS])
def test_plain_postgresql_urls_mean_psycopg3(raw, driver):
    url = settings("--database-url", raw, environ={}).database_url
    assert url.drivername == driver
    assert (url.username, url.host, url.port, url.database) == ("u", "h", 5432, "db")


@pytest.mark.parametrize("raw", ["mysql://u@h/db", "mysql+pymysql://u@h/db", "sqlite:///x.db", "not a url"])
def test_non_postgresql_urls_are_refused(raw):
    message = config_error("--database-url", raw, environ={})
    assert "postgresql" in message.lower()


def test_password_is_kept_but_hidden_in_repr():
    s = settings("--database-url", "postgresql://u:s3cret-pw@h/db", environ={})
    assert s.database_url.password == "s3cret-pw"
    assert "s3cret-pw" not in repr(s)


# ---------------------------------------------------------------- numbers

BAD_NUMBERS = [
    ("rate limit zero", ["--rate-limit", "0"], {}, "--rate-limit"),
    ("rate limit negative", ["--rate-limit", "-5"], {}, "--rate-limit"),
    ("rate limit NaN", ["--rate-limit", "nan"], {}, "--rate-limit"),
    ("rate limit words", ["--rate-limit", "fast"], {}, "--rate-limit"),
    ("concurrency abc", ["--concurrency", "abc"], {}, "--concurrency"),
    ("concurrency a fraction", ["--concurrency", "1.5"], {}, "--concurrency"),
    ("concurrency zero", ["--concurrency", "0"], {}, "--concurrency"),
    ("read timeout zero", ["--read-timeout", "0"], {}, "--read-timeout"),
    ("max attempts zero", ["--max-attempts", "0"], {}, "--max-attempts"),
    ("inline attempts zero", ["--inline-attempts", "0"], {}, "--inline-attempts"),
    ("poll interval negative", ["--poll-interval", "-1"], {}, "--poll-interval"),
    ("log format", ["--log-format", "xml"], {}, "--log-format"),
    ("retain dead not a duration", ["--retain-dead", "forever"], {}, "--retain-dead"),
]

BAD_ENV_NUMBERS = [
    ("env rate limit negative", [], {"FP_OUTBOX_RATE_LIMIT": "-1"}, ("--rate-limit", "FP_OUTBOX_RATE_LIMIT")),
    ("env rate limit words", [], {"FP_OUTBOX_RATE_LIMIT": "lots"}, ("--rate-limit", "FP_OUTBOX_RATE_LIMIT")),
    ("env concurrency abc", [], {"FP_OUTBOX_CONCURRENCY": "abc"}, ("--concurrency", "FP_OUTBOX_CONCURRENCY")),
    ("env read timeout zero", [], {"FP_OUTBOX_READ_TIMEOUT": "0"}, ("--read-timeout", "FP_OUTBOX_READ_TIMEOUT")),
]


@pytest.mark.parametrize("argv, extra_env, name", [c[1:] for c in BAD_NUMBERS], ids=[c[0] for c in BAD_NUMBERS])
def test_bad_flag_values_name_the_flag(argv, extra_env, name):
    assert name in config_error(*argv, environ={**ENV, **extra_env})


@pytest.mark.parametrize("argv, extra_env, names", [c[1:] for c in BAD_ENV_NUMBERS],
                         ids=[c[0] for c in BAD_ENV_NUMBERS])
def test_bad_environment_values_name_the_flag_or_variable(argv, extra_env, names):
    message = config_error(*argv, environ={**ENV, **extra_env})
    assert any(name in message for name in names), message


def test_retry_cap_below_base_is_refused():
    message = config_error("--retry-base", "10", "--retry-cap", "5")
    assert "--retry-cap" in message and "--retry-base" in message


INFINITE = [
    ("retry cap inf", ["--retry-cap", "inf"], {}, "--retry-cap"),
    ("read timeout inf", ["--read-timeout", "inf"], {}, "--read-timeout"),
    ("rate limit inf", ["--rate-limit", "inf"], {}, "--rate-limit"),
    ("env poll interval inf", [], {"FP_OUTBOX_POLL_INTERVAL": "inf"}, "poll"),
]


@pytest.mark.parametrize("argv, extra_env, fragment", [c[1:] for c in INFINITE], ids=[c[0] for c in INFINITE])
def test_infinite_numbers_are_a_config_error(argv, extra_env, fragment):
    assert fragment in config_error(*argv, environ={**ENV, **extra_env}).lower()


@pytest.mark.parametrize("argv", [["--retry-cap", "1e20"], ["--poll-interval", "1e20"]],
                         ids=["retry cap 1e20", "poll interval 1e20"])
def test_numbers_too_large_for_a_duration_are_a_config_error(argv):
    assert argv[0] in config_error(*argv)


# ---------------------------------------------------------------- endpoint

GOOD_ENDPOINTS = ["https://api.perfalytics.com/track", "http://127.0.0.1:8080/track", "HTTPS://example.com/t"]
BAD_ENDPOINTS = [
    "ftp://example.com/track",
    "example.com/track",
    "https:///track",
    "https://example.com/track?token=abc",
    "https://user:pw@example.com/track",
    "",
]


@pytest.mark.parametrize("endpoint", GOOD_ENDPOINTS)
def test_http_endpoints_are_accepted(endpoint):
    assert settings("--endpoint", endpoint).endpoint == endpoint


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_other_endpoints_are_refused(endpoint):
    assert "--endpoint" in config_error("--endpoint", endpoint)


def test_bad_endpoint_from_environment_is_refused():
    with pytest.raises(ConfigError):
        settings(environ={**ENV, "FP_OUTBOX_ENDPOINT": "https://e.example/track?x=1"})


# ---------------------------------------------------------------- token and lease

@pytest.mark.parametrize("source", ["flag", "env"])
def test_token_never_appears_in_repr(source):
    argv = ["--token", TOKEN] if source == "flag" else []
    environ = {**ENV, "FP_OUTBOX_TOKEN": TOKEN} if source == "env" else ENV
    s = settings(*argv, environ=environ)
    assert s.token == TOKEN
    assert TOKEN not in repr(s)
    assert TOKEN not in str(s)


LEASES = [
    ("defaults", []),
    ("short timeouts", ["--connect-timeout", "0.1", "--read-timeout", "0.2", "--inline-attempts", "1"]),
    ("long timeouts", ["--connect-timeout", "6", "--read-timeout", "15", "--inline-attempts", "10"]),
]


@pytest.mark.parametrize("argv", [c[1] for c in LEASES], ids=[c[0] for c in LEASES])
def test_lease_outlasts_the_send_budget(argv):
    s = settings(*argv)
    assert s.send_budget >= timedelta(seconds=s.inline_attempts * (s.connect_timeout + s.read_timeout))
    assert s.lease > s.send_budget
    assert s.lease - s.send_budget >= timedelta(seconds=5)


@pytest.mark.parametrize("argv", [c[1] for c in LEASES], ids=[c[0] for c in LEASES])
def test_a_stop_fits_its_30_s_whatever_the_settings_accepted(argv):
    """The stop budget: a whole request's grace (or the database call running at the signal, if longer), then
    the last settle and the release, then the exit; every part derived from the settings."""
    from worker.engine.settings import REAP_SLACK, STOP_LIMIT

    budget = settings(*argv).stop_budget
    assert budget.grace >= settings(*argv).request_deadline + REAP_SLACK
    assert budget.wind_down >= budget.in_progress >= 10  # a connection attempt's own timeout, at the signal
    assert budget.final > 7 and budget.exit > 0
    assert budget.total == budget.wind_down + budget.final + budget.exit <= STOP_LIMIT


@pytest.mark.parametrize("argv", [
    ["--read-timeout", "30"],
    ["--connect-timeout", "10", "--read-timeout", "11.5"],
    ["--connect-timeout", "25", "--read-timeout", "1"],
], ids=["long read timeout", "just over", "long connect timeout"])
def test_settings_whose_stop_cannot_fit_30_s_are_refused_naming_the_flags(argv):
    message = config_error(*argv)
    assert "--connect-timeout + --read-timeout" in message and "30 s" in message and "at most 21 s" in message


def test_the_longest_request_a_stop_can_wait_for_is_accepted():
    assert settings("--connect-timeout", "10", "--read-timeout", "11").stop_budget.total <= 30


def test_owner_is_unique_per_settings():
    assert settings().owner != settings().owner


# ---------------------------------------------------------------- the real command lines

def _env_without_url() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FP_OUTBOX_") and k != "DATABASE_URL"}


CLIS = [
    ("worker", [sys.executable, "-m", "worker"]),
    ("admin status", [sys.executable, "-c", "import sys; from worker.admin import main; sys.exit(main(['status']))"]),
]


@pytest.mark.parametrize("cmd", [c[1] for c in CLIS], ids=[c[0] for c in CLIS])
def test_cli_without_database_url_exits_2_naming_the_flag(cmd):
    done = subprocess.run(cmd, env=_env_without_url(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--database-url" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- the token must fit the room validation keeps

def test_a_token_too_long_for_the_room_kept_for_it_is_refused_without_being_shown():
    import outbox

    long_token = "x" * outbox.TOKEN_ALLOWANCE
    message = config_error("--token", long_token)
    assert "--token" in message and str(outbox.TOKEN_ALLOWANCE) in message
    assert long_token not in message


def test_a_token_with_quotes_is_measured_as_it_is_sent():
    import outbox

    fits = "a" * (outbox.TOKEN_ALLOWANCE - len(',"token":""'))
    assert settings("--token", fits).token == fits
    config_error("--token", fits[:-1] + '"')  # JSON escapes the quote: one byte more than it looks


def test_an_environment_id_fits():
    assert settings("--token", "2ce2b45b-af44-4426-a3ef-a314abce9c85").token
