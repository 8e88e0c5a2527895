"""The worker's configuration: one frozen Settings, built once from flags and environment, validated there."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.engine import URL

from outbox.db import CONNECT_ARGS, ConfigError, database_url
from outbox.validation import TOKEN_ALLOWANCE
from worker.engine.durations import parse_duration
from worker.engine.policy import Backoff
from worker.engine.timeouts import CALL_DEADLINE, WATCH_EVERY

DEFAULT_ENDPOINT = "https://api.perfalytics.com/track"

# (flag, environment variable, default, type, help): one table, so docs/configuration.md and --help agree.
OPTIONS: list[tuple[str, str | None, object, type, str]] = [
    ("--endpoint", "FP_OUTBOX_ENDPOINT", DEFAULT_ENDPOINT, str, "the /track URL events are POSTed to"),
    ("--rate-limit", "FP_OUTBOX_RATE_LIMIT", 5000.0, float, "requests/s for all workers on this database together"),
    ("--concurrency", "FP_OUTBOX_CONCURRENCY", 32, int, "requests in flight at once in this worker"),
    ("--connect-timeout", "FP_OUTBOX_CONNECT_TIMEOUT", 3.05, float, "seconds to open a connection"),
    ("--read-timeout", "FP_OUTBOX_READ_TIMEOUT", 10.0, float, "seconds to wait for an answer"),
    ("--inline-attempts", "FP_OUTBOX_INLINE_ATTEMPTS", 3, int, "quick in-process tries per claim"),
    ("--max-attempts", "FP_OUTBOX_MAX_ATTEMPTS", 25, int, "claims before an event is dead"),
    ("--retry-base", "FP_OUTBOX_RETRY_BASE", 1.0, float, "seconds: first durable retry delay"),
    ("--retry-cap", "FP_OUTBOX_RETRY_CAP", 3600.0, float, "seconds: longest durable retry delay"),
    ("--retry-after-cap", "FP_OUTBOX_RETRY_AFTER_CAP", 600.0, float, "seconds: most a Retry-After is honoured"),
    ("--poll-interval", "FP_OUTBOX_POLL_INTERVAL", 1.0, float, "seconds between polls when no notification came"),
    ("--startup-timeout", "FP_OUTBOX_STARTUP_TIMEOUT", 60.0, float, "seconds to keep trying to reach the database at start"),
    ("--log-format", "FP_OUTBOX_LOG_FORMAT", "text", str, "text (key=value) or json"),
    ("--metrics-port", "FP_OUTBOX_METRICS_PORT", 0, int, "serve Prometheus /metrics on this port (0: off)"),
    ("--retain-delivered", "FP_OUTBOX_RETAIN_DELIVERED", "7d", str,
     "retire delivered events older than this, by whole partitions (7d, 12h, ...; off: keep them)"),
    ("--retain-dead", "FP_OUTBOX_RETAIN_DEAD", "30d", str,
     "delete dead letters that died longer ago than this (30d, ...; off: keep them)"),
]

# The prefix of every worker connection's application_name (and the count of workers in `fp-outbox status`).
WORKER_APPLICATION_NAME = "fp-outbox-worker"
# Inline retries wait 0.1 s, 0.2 s, 0.4 s ... at most this long each; longer waits go to the row.
INLINE_WAIT_CAP = 1.0
# Seconds a request may overrun its total deadline before the reaper cuts it (worker.engine.transport).
REAP_SLACK = 0.25
# Seconds kept free at the end of every lease for settling the outcome: no attempt starts unless its
# whole deadline ends at least this long before the lease does.
LEASE_MARGIN = 2.0
# SIGTERM to exit, as promised (systemd's TimeoutStopSec=40 kills the process after that).
STOP_LIMIT = 30.0
# Seconds a database connection attempt may take (libpq's connect_timeout, outbox.db), and a call once
# connected (the worker's own deadline, worker.engine.timeouts, checked every WATCH_EVERY).
DB_CONNECT_TIMEOUT = float(CONNECT_ARGS["connect_timeout"])
# Seconds from the last database call of a stop to the process's exit: the last log line, the metrics server's
# shutdown (a poll of 0.5 s), the interpreter's exit.
STOP_EXIT = 1.5


@dataclass(frozen=True)
class StopBudget:
    """How the seconds from SIGTERM to exit are spent; every part derived from the settings, the total checked
    against STOP_LIMIT when the settings are built. In order:

    - `grace`: requests in flight may finish (one whole request: its deadline and the reaper's tick); the
      database call running at the signal, if any, ends within `in_progress` (connect timeout, or the call
      deadline), alongside: every call made after the signal is cut when the longer of the two is over;
    - `final`: the last settle and the release of what did not finish, every call cut at its end;
    - `exit`: what follows the last call."""

    grace: float
    in_progress: float
    final: float
    exit: float

    @property
    def wind_down(self) -> float:
        """Seconds from the signal until the sends are over and the loop has left its last database call."""
        return max(self.grace, self.in_progress)

    @property
    def total(self) -> float:
        return self.wind_down + self.final + self.exit


@dataclass(frozen=True)
class Settings:
    database_url: URL
    endpoint: str
    token: str | None = field(repr=False)
    rate_limit: float
    concurrency: int
    connect_timeout: float
    read_timeout: float
    inline_attempts: int
    backoff: Backoff
    poll_interval: timedelta
    startup_timeout: timedelta
    drain: bool = False
    log_format: str = "text"
    metrics_port: int | None = None
    retain_delivered: timedelta | None = timedelta(days=7)
    retain_dead: timedelta | None = timedelta(days=30)
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")

    @property
    def application_name(self) -> str:
        """How this worker's connections name themselves in pg_stat_activity (WORKERS_CONNECTED counts them):
        the lease owner's unique part and pid first, so PostgreSQL's 63-byte cut only ever shortens the host."""
        host, pid, unique = self.owner.rsplit(":", 2)
        return f"{WORKER_APPLICATION_NAME} {unique}:{pid}:{host}"[:63]

    @property
    def request_deadline(self) -> float:
        """Seconds one request may take in all, connecting and a trickling answer included."""
        return self.connect_timeout + self.read_timeout

    @property
    def send_budget(self) -> timedelta:
        """The longest one claimed event can take in this worker: every inline try running to its deadline."""
        tries = self.inline_attempts * (self.request_deadline + REAP_SLACK)
        waits = (self.inline_attempts - 1) * INLINE_WAIT_CAP
        return timedelta(seconds=tries + waits)

    @property
    def stop_budget(self) -> StopBudget:
        """How a stop spends its 30 s with these settings (StopBudget)."""
        call = CALL_DEADLINE + WATCH_EVERY
        return StopBudget(grace=self.request_deadline + REAP_SLACK, in_progress=max(DB_CONNECT_TIMEOUT, call),
                          final=call, exit=STOP_EXIT)

    @property
    def lease(self) -> timedelta:
        """Derived from the send budget, so a live worker's lease never runs out under it: the budget plus half
        again (at least 5 s) for the rate wait and the settle, and never less than twice one request and the
        margin, so that after the longest rate wait a claim accepts (half the lease) one whole request fits."""
        budget = self.send_budget
        one = timedelta(seconds=self.request_deadline + REAP_SLACK + LEASE_MARGIN)
        return max(budget + max(timedelta(seconds=5), budget / 2), 2 * one)


def build_parser(prog: str = "fp-outbox-worker") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Deliver fp-outbox events to Freshpaint's /track.")
    parser.add_argument("--database-url", help="SQLAlchemy URL (env FP_OUTBOX_DATABASE_URL, else DATABASE_URL)")
    parser.add_argument("--token", help="environment id filled into events that carry none (env FP_OUTBOX_TOKEN)")
    for flag, env, default, _type, text in OPTIONS:
        parser.add_argument(flag, help=f"{text} (env {env}; default {default})")
    parser.add_argument("--drain", action="store_true", help="exit 0 once no event is pending or in flight")
    parser.add_argument("--embedded", action="store_true",
                        help="use fp-outbox's own embedded PostgreSQL (development; needs the 'embedded' extra)")
    return parser


def from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Flags win over environment variables, which win over defaults. Raises ConfigError."""
    env = os.environ if environ is None else environ
    values = {flag[2:].replace("-", "_"): _value(args, env, flag, var, default, kind)
              for flag, var, default, kind, _ in OPTIONS}
    token = args.token or env.get("FP_OUTBOX_TOKEN") or None
    settings = Settings(
        database_url=database_url(args.database_url, env),
        endpoint=_check_endpoint(values["endpoint"]),
        token=_check_token(token),
        rate_limit=_positive("--rate-limit", values["rate_limit"]),
        concurrency=int(_positive("--concurrency", values["concurrency"])),
        connect_timeout=_positive("--connect-timeout", values["connect_timeout"]),
        read_timeout=_positive("--read-timeout", values["read_timeout"]),
        inline_attempts=int(_positive("--inline-attempts", values["inline_attempts"])),
        backoff=Backoff(
            max_attempts=int(_positive("--max-attempts", values["max_attempts"])),
            base=_duration("--retry-base", values["retry_base"]),
            cap=_duration("--retry-cap", values["retry_cap"]),
            retry_after_cap=_duration("--retry-after-cap", values["retry_after_cap"]),
        ),
        poll_interval=_duration("--poll-interval", values["poll_interval"]),
        startup_timeout=_duration("--startup-timeout", values["startup_timeout"]),
        drain=bool(args.drain),
        log_format=_choice("--log-format", values["log_format"], ("text", "json")),
        metrics_port=_port("--metrics-port", values["metrics_port"]),
        retain_delivered=_retention("--retain-delivered", values["retain_delivered"]),
        retain_dead=_retention("--retain-dead", values["retain_dead"]),
    )
    if settings.backoff.cap < settings.backoff.base:
        raise ConfigError("--retry-cap must be at least --retry-base; raise the cap or lower the base")
    _check_stop_fits(settings)
    return settings


def _check_stop_fits(settings: Settings) -> None:
    """A request in flight at SIGTERM gets its whole deadline to finish; with the parts that follow, the stop
    must fit the 30 s it may take."""
    budget = settings.stop_budget
    if budget.total <= STOP_LIMIT:
        return
    room = STOP_LIMIT - budget.final - budget.exit - REAP_SLACK
    raise ConfigError(
        f"--connect-timeout + --read-timeout is {settings.request_deadline:g} s: a request in flight at SIGTERM "
        f"may take that long to finish, and with the last settle ({budget.final:g} s) and the exit "
        f"({budget.exit:g} s) a stop would take {budget.total:g} s, past the {STOP_LIMIT:g} s it may; keep "
        f"their sum at most {room:g} s"
    )


def _value(args: argparse.Namespace, env, flag: str, var: str, default, kind: type):
    raw = getattr(args, flag[2:].replace("-", "_"), None)
    source = flag
    if raw is None and env.get(var):
        raw, source = env[var], var
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{source} must be a {kind.__name__}, got {raw!r}") from None


def _positive(name: str, value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number greater than 0, got {value!r}")
    return value


def _duration(name: str, value: float) -> timedelta:
    try:
        return timedelta(seconds=_positive(name, value))
    except OverflowError:
        raise ConfigError(f"{name} is too large to be a duration: {value!r} seconds") from None


def _port(name: str, value: int) -> int | None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be a TCP port (1-65535), or 0 for none; got {value}")
    return value or None


def _retention(name: str, value: str) -> timedelta | None:
    if value.strip().lower() in ("off", "0", "none"):
        return None
    try:
        return parse_duration(value.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}; or 'off' to keep those rows") from None


def _check_token(token: str | None) -> str | None:
    """The token must fit the room validation keeps for it in every event that carries none, so that what is
    sent stays under outbox.MAX_EVENT_BYTES; the message never shows the token itself."""
    if token is None:
        return None
    added = len(("," + json.dumps("token") + ":" + json.dumps(token, ensure_ascii=False)).encode())
    if added > TOKEN_ALLOWANCE:
        raise ConfigError(
            f"--token (or FP_OUTBOX_TOKEN) is {len(token)} characters long and would add {added} bytes to each "
            f"event, more than the {TOKEN_ALLOWANCE} bytes enqueue keeps free for it; a Freshpaint environment "
            "id is 36 characters: check that the variable holds just the id"
        )
    return token


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_endpoint(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--endpoint must be an http(s) URL such as {DEFAULT_ENDPOINT}, got {url!r}")
    if parts.username or parts.password or parts.query:
        raise ConfigError("--endpoint must not carry credentials or a query; pass the token with --token")
    return url
