"""Flags and argument types that several admin commands share: the database, --limit/--json, the dead
filters, --dry-run/--yes, durations and batch sizes."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from worker.engine import parse_duration

MAX_BATCH_SIZE = 100_000


def add_database_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="SQLAlchemy URL (env FP_OUTBOX_DATABASE_URL, else DATABASE_URL)")
    parser.add_argument("--embedded", action="store_true",
                        help="use fp-outbox's own embedded PostgreSQL (development; needs the 'embedded' extra)")


def add_limit_and_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=positive_int_arg, default=50, help="show at most N rows (default 50)")
    parser.add_argument("--json", action="store_true", help="a JSON array instead of a table")


def add_dead_filters(parser: argparse.ArgumentParser, suffix: str = "") -> None:
    parser.add_argument("--event", metavar="NAME", help=f"only events with this name{suffix}")
    parser.add_argument("--older-than", type=duration_arg, metavar="DURATION",
                        help=f"only events dead for longer than this, e.g. 12h{suffix}")
    parser.add_argument("--error", metavar="SUBSTRING",
                        help=f"only events whose last error contains this (any case), e.g. 'HTTP 400'{suffix}")


def add_confirmation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="only count; change nothing")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def duration_arg(value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int_arg(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def batch_size_arg(value: str) -> int:
    size = positive_int_arg(value)
    if size > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(
            f"{size} rows per transaction is more than {MAX_BATCH_SIZE:,}; a smaller batch locks for less time")
    return size


def dead_params(args: argparse.Namespace) -> dict[str, Any]:
    older = getattr(args, "older_than", None)
    return {"event": getattr(args, "event", None), "error": getattr(args, "error", None),
            "older_than_s": None if older is None else older.total_seconds()}
