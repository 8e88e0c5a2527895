"""The body the worker POSTs for one claimed row, built in Python from the stored payload text and the row's
insert_id column: the token never travels to the database, not even as a statement parameter.

Rows written by `enqueue` are validated events already; rows written by hand may not be, and are refused
here with the reason their dead letter records (instead of failing the claim for everyone).
"""

from __future__ import annotations

import json
from typing import Any

NO_TOKEN = ("no token: the event carries no properties.token and the worker has none; "
            "set FP_OUTBOX_TOKEN (or --token) and requeue")
MALFORMED = ("malformed payload: {why} (was the row written without outbox.enqueue?); "
             "fix the payload and requeue")


class Unsendable(ValueError):
    """This row cannot be sent as it is; the message is the dead letter's reason."""


class NoToken(Unsendable):
    """Neither the event nor the worker has a token."""


class MalformedPayload(Unsendable):
    """The stored payload is not an event (an object with a string 'event' and an object 'properties')."""


def event_body(payload: str, insert_id: str, token: str | None) -> bytes:
    """The bytes to POST: `payload` as stored, plus `token` when the event carries no string properties.token
    and the row's `insert_id` when it carries no $insert_id. Raises NoToken or MalformedPayload."""
    event = _event_of(payload)
    properties = event["properties"]
    additions: dict[str, str] = {}
    if not _usable(properties.get("token")):
        if not token:
            raise NoToken(NO_TOKEN)
        additions["token"] = token
    if not _usable(properties.get("$insert_id")):
        additions["$insert_id"] = insert_id
    if not additions:
        return payload.encode()  # what was validated and stored is what is sent
    properties.update(additions)
    try:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise MalformedPayload(MALFORMED.format(why=f"it cannot be sent as JSON ({exc.__class__.__name__})")) from None


def _event_of(payload: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):
        raise MalformedPayload(MALFORMED.format(why="not JSON")) from None
    if not (isinstance(event, dict) and isinstance(event.get("event"), str)
            and isinstance(event.get("properties"), dict)):
        raise MalformedPayload(MALFORMED.format(
            why="not an object with a string 'event' and an object 'properties'"))
    return event


def _usable(value: Any) -> bool:
    return isinstance(value, str) and value != ""
