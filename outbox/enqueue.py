"""Writing events into the outbox table on the caller's connection, inside the caller's transaction.

Every function validates first (pure code, no SQL), then runs one statement on the caller's
connection; none of them commits. The synchronous and asyncio functions share the validation,
the statements and the parameters; only the execution differs (`outbox.handles`). When the application
traces with OpenTelemetry, the row also keeps the active span's context (`outbox.tracecontext`), apart
from the payload.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from outbox import tracecontext
from outbox.handles import async_executor, executor
from outbox.statements import INSERT_MANY, INSERT_MANY_TRACED, INSERT_ONE, INSERT_ONE_TRACED, Statement
from outbox.validation import identify_event, prepare, prepare_many

if TYPE_CHECKING:  # only for type checkers: importing these would pull in asyncio pieces
    import psycopg
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
    from sqlalchemy.orm import Session, scoped_session

    Handle: TypeAlias = Session | scoped_session | Connection | psycopg.Connection
    AsyncHandle: TypeAlias = AsyncSession | async_scoped_session | AsyncConnection | psycopg.AsyncConnection


def enqueue(session: Handle, event: Mapping[str, Any]) -> str:
    """Write `event` into the outbox within `session`'s transaction and return its `$insert_id`.

    `session`: a SQLAlchemy Session or Connection, or a psycopg Connection. Never commits. Raises
    `InvalidEvent` (nothing written, transaction untouched) on bad input.
    """
    execute = executor(session)
    insert_id, statement, params = _one(event)
    execute(statement, params)
    return insert_id


def enqueue_many(session: Handle, events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Write many events in one statement; all are validated before any is written."""
    execute = executor(session)
    insert_ids, statement, params = _many(events)
    if insert_ids:
        execute(statement, params)
    return insert_ids


def identify(
    session: Handle,
    distinct_id: str,
    user_props: Mapping[str, Any],
    *,
    device_id: str | None = None,
    time: float | None = None,
) -> str:
    """Enqueue the HTTP API's `$identify` event, attaching `user_props` to the user."""
    execute = executor(session)
    insert_id, statement, params = _one(identify_event(distinct_id, user_props, device_id, time))
    execute(statement, params)
    return insert_id


async def enqueue_async(session: AsyncHandle, event: Mapping[str, Any]) -> str:
    """`enqueue` for asyncio: a SQLAlchemy AsyncSession or AsyncConnection, or a psycopg AsyncConnection."""
    execute = async_executor(session)
    insert_id, statement, params = _one(event)
    await execute(statement, params)
    return insert_id


async def enqueue_many_async(session: AsyncHandle, events: Iterable[Mapping[str, Any]]) -> list[str]:
    """`enqueue_many` for asyncio."""
    execute = async_executor(session)
    insert_ids, statement, params = _many(events)
    if insert_ids:
        await execute(statement, params)
    return insert_ids


async def identify_async(
    session: AsyncHandle,
    distinct_id: str,
    user_props: Mapping[str, Any],
    *,
    device_id: str | None = None,
    time: float | None = None,
) -> str:
    """`identify` for asyncio."""
    execute = async_executor(session)
    insert_id, statement, params = _one(identify_event(distinct_id, user_props, device_id, time))
    await execute(statement, params)
    return insert_id


def _one(event: Any) -> tuple[str, Statement, dict[str, Any]]:
    insert_id, name, payload = prepare(event)
    params = {"insert_id": insert_id, "event_name": name, "payload": payload}
    trace_context = tracecontext.current()
    if trace_context is None:
        return insert_id, INSERT_ONE, params
    return insert_id, INSERT_ONE_TRACED, {**params, "trace_context": trace_context}


def _many(events: Iterable[Any]) -> tuple[list[str], Statement, dict[str, Any]]:
    prepared = prepare_many(events)
    insert_ids, names, payloads = (list(column) for column in zip(*prepared)) if prepared else ([], [], [])
    params = {"insert_ids": insert_ids, "event_names": names, "payloads": payloads}
    trace_context = tracecontext.current()
    if trace_context is None:
        return insert_ids, INSERT_MANY, params
    return insert_ids, INSERT_MANY_TRACED, {**params, "trace_context": trace_context}
