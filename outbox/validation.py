"""Pure validation and normalisation of events: everything `enqueue` checks before it touches SQL."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

#: The largest payload, as stored and sent (UTF-8 JSON), that `enqueue` accepts.
MAX_EVENT_BYTES = 64 * 1024

#: `time` must lie between 2000-01-01 and one day ahead of this machine's clock; outside that
#: it is almost always milliseconds, microseconds or a bug, and the destination would misfile it.
EARLIEST_EVENT_TIME = 946_684_800.0
MAX_FUTURE_SECONDS = 86_400.0


class InvalidEvent(ValueError):
    """An event that cannot be enqueued; the message names the field and what to do."""


def prepare(event: Any, now: float | None = None) -> tuple[str, str, str]:
    """Validate `event` and return (insert_id, event name, JSON payload) ready to insert."""
    if not isinstance(event, Mapping):
        raise InvalidEvent(
            f"event must be a mapping like {{'event': ..., 'properties': {{...}}}}, got {type(event).__name__}"
        )
    name = event.get("event")
    if not isinstance(name, str) or not name.strip():
        raise InvalidEvent(f"'event' must be a non-empty string naming the event, got {_show(name)}")
    props = event.get("properties")
    if not isinstance(props, Mapping):
        raise InvalidEvent(
            f"'properties' must be a mapping holding at least 'distinct_id', got {_show(props)}"
        )
    properties = dict(props)
    _check_distinct_id(properties.get("distinct_id"))
    properties["time"] = _check_time(properties.get("time", None), now)
    properties["$insert_id"] = _check_insert_id(properties)
    payload = {**event, "properties": properties}
    return properties["$insert_id"], name, _to_json(payload)


def _check_distinct_id(value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent(
            f"'properties.distinct_id' must be a non-empty string identifying the user, got {_show(value)}"
        )


def _check_time(value: Any, now: float | None) -> float | int:
    """Return the event time, filled with the current time (millisecond precision) when absent."""
    current = time.time() if now is None else now
    if value is None:
        return round(current, 3)
    if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)):
        raise InvalidEvent(
            f"'properties.time' must be epoch seconds as a number, got {_show(value)}; "
            "leave it out to use the current time"
        )
    try:
        seconds = float(value)
    except (OverflowError, ValueError):  # 10**400, Decimal("sNaN")
        seconds = math.nan
    if not math.isfinite(seconds):
        raise InvalidEvent(f"'properties.time' must be a finite number of epoch seconds, got {value!r}")
    if not EARLIEST_EVENT_TIME <= seconds <= current + MAX_FUTURE_SECONDS:
        raise InvalidEvent(
            f"'properties.time' = {value!r} is not plausible epoch seconds (expected between "
            f"{EARLIEST_EVENT_TIME:.0f} and now + 1 day); milliseconds must be divided by 1000"
        )
    return value if isinstance(value, int) else seconds


def _check_insert_id(properties: dict[str, Any]) -> str:
    if "$insert_id" not in properties:
        return str(uuid.uuid4())
    value = properties["$insert_id"]
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent(
            f"'properties.$insert_id' must be a non-empty string when given, got {_show(value)}; "
            "leave it out and one is generated"
        )
    return value


def _json_default(value: Any) -> Any:
    """Convert the values whose JSON meaning is unambiguous; everything else is rejected."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError("non-finite Decimal")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        raise TypeError("a set has no order in JSON; pass a list")
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _to_json(payload: dict[str, Any]) -> str:
    try:
        encoded = json.dumps(payload, default=_json_default, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        path, reason = _find_unserializable(payload)
        raise InvalidEvent(
            f"'{path}' cannot be stored as JSON ({reason or exc}); convert it to a string, number, "
            "bool, list or mapping"
        ) from None
    size = len(encoded.encode())
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(
            f"the event is {size} bytes as JSON, over the {MAX_EVENT_BYTES}-byte limit; "
            "drop or shorten large properties"
        )
    return encoded


def _find_unserializable(value: Any, path: str = "") -> tuple[str, str]:
    """Walk the payload to name the first value JSON cannot hold (only on the error path)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                return f"{path or 'event'}", f"key {key!r} is a {type(key).__name__}, not a string"
            found = _find_unserializable(item, f"{path}.{key}" if path else str(key))
            if found[0]:
                return found
        return "", ""
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _find_unserializable(item, f"{path}[{index}]")
            if found[0]:
                return found
        return "", ""
    if isinstance(value, float) and not math.isfinite(value):
        return path, f"{value!r} is not a finite number"
    if value is None or isinstance(value, str | int | float | bool):
        return "", ""
    try:
        _json_default(value)
    except (TypeError, ValueError) as exc:
        return path, str(exc)
    return "", ""


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"
