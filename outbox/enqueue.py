"""Writing events into the outbox table on the caller's connection, inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, scoped_session

from outbox.schema import NOTIFY_CHANNEL
from outbox.validation import InvalidEvent, prepare

# One round trip per call: the insert and the wake-up notification (which PostgreSQL delivers
# only at commit, and folds into one per transaction) travel as a single statement.
_INSERT_ONE = text(
    "WITH inserted AS ("
    " INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
    " VALUES (:insert_id, :event_name, CAST(:payload AS json)) RETURNING 1)"
    f" SELECT pg_notify('{NOTIFY_CHANNEL}', '')"
)

# Many rows in one statement: three parallel arrays unnested server-side.
_INSERT_MANY = text(
    "WITH inserted AS ("
    " INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
    " SELECT u.insert_id, u.event_name, CAST(u.payload AS json)"
    " FROM unnest(CAST(:insert_ids AS text[]), CAST(:event_names AS text[]), CAST(:payloads AS text[]))"
    " AS u(insert_id, event_name, payload) RETURNING 1)"
    f" SELECT pg_notify('{NOTIFY_CHANNEL}', '')"
)


def enqueue(session: Session | Connection, event: Mapping[str, Any]) -> str:
    """Write `event` into the outbox within `session`'s transaction and return its `$insert_id`.

    Never commits. Raises `InvalidEvent` (nothing written, transaction untouched) on bad input.
    """
    _check_session(session)
    insert_id, name, payload = prepare(event)
    session.execute(_INSERT_ONE, {"insert_id": insert_id, "event_name": name, "payload": payload})
    return insert_id


def enqueue_many(session: Session | Connection, events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Write many events in one statement; all are validated before any is written."""
    _check_session(session)
    prepared = []
    for index, event in enumerate(events):
        try:
            prepared.append(prepare(event))
        except InvalidEvent as exc:
            raise InvalidEvent(f"events[{index}]: {exc}") from None
    if not prepared:
        return []
    insert_ids, names, payloads = (list(column) for column in zip(*prepared))
    session.execute(
        _INSERT_MANY, {"insert_ids": insert_ids, "event_names": names, "payloads": payloads}
    )
    return insert_ids


def identify(
    session: Session | Connection,
    distinct_id: str,
    user_props: Mapping[str, Any],
    *,
    device_id: str | None = None,
    time: float | None = None,
) -> str:
    """Enqueue the HTTP API's `$identify` event, attaching `user_props` to the user."""
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
    return enqueue(session, {"event": "$identify", "properties": properties})


def _check_session(session: Any) -> None:
    if not isinstance(session, Session | Connection | scoped_session):
        raise TypeError(
            "enqueue needs a synchronous SQLAlchemy Session or Connection (the one your business "
            f"data is written with), got {type(session).__name__}"
        )
