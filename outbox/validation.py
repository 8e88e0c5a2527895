"""Pure validation and normalisation of events: everything `enqueue` checks before it touches SQL."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

#: The largest payload, as stored and sent (UTF-8 JSON), that `enqueue` accepts.
MAX_EVENT_BYTES = 64 * 1024

#: Bytes kept free for the token the worker adds at send time to an event that carries none
#: (`,"token":"` + an environment id + `"`: 48 bytes for a UUID), so what is sent stays under the limit.
TOKEN_ALLOWANCE = 100
_LIMIT_WITHOUT_TOKEN = MAX_EVENT_BYTES - TOKEN_ALLOWANCE

#: Mappings and lists nested deeper than this (the event object itself is level 1) are refused:
#: no analytics property needs it, and a cycle or a runaway structure is caught before it costs anything.
MAX_NESTING = 32

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
    return properties["$insert_id"], name, _to_json(payload, event)


def prepare_many(events: Iterable[Any], now: float | None = None) -> list[tuple[str, str, str]]:
    """`prepare` every event, all before any is written; an error names the event's index."""
    prepared = []
    for index, event in enumerate(events):
        try:
            prepared.append(prepare(event, now))
        except InvalidEvent as exc:
            raise InvalidEvent(f"events[{index}]: {exc}") from None
    return prepared


def identify_event(
    distinct_id: Any, user_props: Any, device_id: Any = None, time: Any = None
) -> dict[str, Any]:
    """The HTTP API's `$identify` event attaching `user_props` to the user (checked again by `prepare`)."""
    if not isinstance(user_props, Mapping):
        raise InvalidEvent(
            f"'user_props' must be a mapping of user properties, got {type(user_props).__name__}"
        )
    properties: dict[str, Any] = {"distinct_id": distinct_id, "$user_props": dict(user_props)}
    if device_id is not None:
        if not isinstance(device_id, str) or not device_id.strip():
            raise InvalidEvent(f"'device_id' must be a non-empty string when given, got {device_id!r}")
        properties["$device_id"] = device_id
    if time is not None:
        properties["time"] = time
    return {"event": "$identify", "properties": properties}


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
            raise ValueError(f"Decimal {value} is not a finite number; pass a number or None")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        raise TypeError("a set has no order in JSON; pass a list")
    raise TypeError(
        f"{type(value).__name__} is not JSON-serializable; convert it to a string, number, bool, list or mapping"
    )


def _to_json(payload: dict[str, Any], original: Mapping[str, Any]) -> str:
    """The payload as the exact text that is stored and sent, checked against what PostgreSQL accepts.

    A problem is looked for in the caller's `original` event, so that its path (a cycle's above all)
    is the one the caller wrote, not one through the copies made here."""
    try:
        encoded = json.dumps(payload, default=_json_default, allow_nan=False, ensure_ascii=False,
                             separators=(",", ":"))
        size = len(encoded.encode())  # a lone surrogate has no UTF-8 form
    except (TypeError, ValueError, RecursionError) as exc:  # a cycle, too deep, not JSON
        raise _refusal(original, str(exc)) from None
    # Cheap tests on the text decide when the walk must look: json.dumps writes a NUL as \u0000,
    # and a structure cannot nest deeper than it has brackets.
    if "\\u0000" in encoded or encoded.count("{") + encoded.count("[") > MAX_NESTING:
        problem = _find_problem(original, "", 1, set())
        if problem:
            raise _refusal(original, "", problem)
    limit = MAX_EVENT_BYTES if isinstance(payload["properties"].get("token"), str) else _LIMIT_WITHOUT_TOKEN
    if size > limit:
        raise InvalidEvent(
            f"the event is {size} bytes as JSON, over the {MAX_EVENT_BYTES}-byte limit"
            + ("" if limit == MAX_EVENT_BYTES else
               f" less {TOKEN_ALLOWANCE} bytes kept for the token the worker adds ({limit} bytes)")
            + "; drop or shorten large properties"
        )
    return encoded


def _refusal(event: Any, error: str, problem: tuple[str, str] | None = None) -> InvalidEvent:
    path, reason = problem or _find_problem(event, "", 1, set()) or ("event", error)
    return InvalidEvent(f"'{_shorten(path or 'event')}' cannot be stored as JSON: {reason}")


def _find_problem(value: Any, path: str, depth: int, open_containers: set[int]) -> tuple[str, str] | None:
    """Walk the payload to name the first value that cannot be stored (only when one is suspected)."""
    if isinstance(value, str):
        return _string_problem(value, path)
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"{value!r} is not a finite number; pass a number or None")
    if not isinstance(value, Mapping | list | tuple):
        try:
            value = _json_default(value)
        except (TypeError, ValueError) as exc:
            return path, str(exc)
        return _find_problem(value, path, depth, open_containers) if isinstance(value, dict) else None
    if id(value) in open_containers:
        return path, "it contains itself (a cycle); pass a copy without the cycle"
    if depth > MAX_NESTING:
        return path, f"it nests mappings and lists deeper than {MAX_NESTING} levels; flatten it"
    open_containers.add(id(value))
    try:
        return _find_in_children(value, path, depth, open_containers)
    finally:
        open_containers.discard(id(value))


def _find_in_children(value: Any, path: str, depth: int, open_containers: set[int]) -> tuple[str, str] | None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                return path or "event", f"key {key!r} is a {type(key).__name__}, not a string"
            child = _key_path(path, key)
            found = (_string_problem(key, child) if isinstance(key, str) else None) or _find_problem(
                item, child, depth + 1, open_containers)
            if found:
                return found
        return None
    for index, item in enumerate(value):
        found = _find_problem(item, f"{path}[{index}]", depth + 1, open_containers)
        if found:
            return found
    return None


def _string_problem(text: str, path: str) -> tuple[str, str] | None:
    """PostgreSQL stores no NUL character, and UTF-8 has no form for a lone surrogate."""
    if "\x00" in text:
        return path, "it holds a NUL character (\\x00), which PostgreSQL cannot store; remove it"
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return path, (f"it holds a lone surrogate {text[exc.start]!r}, which is not valid Unicode; "
                      "replace or remove it (decoding with errors='replace' does)")
    return None


def _key_path(path: str, key: Any) -> str:
    name = str(key)
    if name.isprintable() and name and not any(c in name for c in ".[]'"):
        return f"{path}.{name}" if path else name
    return f"{path or 'event'}[{name!r}]"


def _shorten(path: str, keep: int = 60) -> str:
    return path if len(path) <= 2 * keep else f"{path[:keep]}...{path[-keep:]}"


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"
