"""Durations as people write them on a command line (7d, 12h, 30m, 90s, 2w): for --retain-delivered and
the admin commands' ages."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: How long the worker keeps delivered rows unless --retain-delivered / FP_OUTBOX_RETAIN_DELIVERED says otherwise.
DEFAULT_RETAIN_DELIVERED = timedelta(days=7)


def parse_duration(value: str) -> timedelta:
    """'7d', '12h', '30m', '90s' (or 'w' for weeks) as a timedelta; ValueError naming the format otherwise."""
    match = _DURATION.match(value or "")
    if not match:
        raise ValueError(f"{value!r} is not a duration: write a number and a unit, e.g. 7d, 12h, 30m or 90s")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_retention(value: str) -> timedelta | None:
    """The worker's --retain-delivered: a duration like 7d, or 'off' (None: the worker purges nothing)."""
    return None if value.strip().lower() == "off" else parse_duration(value)


def format_duration(delta: timedelta) -> str:
    """The largest whole unit up to days: 7d, 36h, 90s; for messages."""
    seconds = delta.total_seconds()
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNIT_SECONDS[unit] == 0:
            return f"{int(seconds // _UNIT_SECONDS[unit])}{unit}"
    return f"{seconds:g}s"
