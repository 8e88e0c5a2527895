"""The kinds of connection `enqueue` writes on, and how each executes a statement in the caller's transaction.

Validation and SQL are shared (`outbox.validation`, `outbox.statements`); what differs per kind is only
how a statement and its parameters are executed, and how the workers are woken after the commit
(`outbox.wake`: SQLAlchemy handles arrange it themselves; psycopg has no commit hook).

The asyncio and psycopg classes are looked up in `sys.modules`: a handle of theirs can only exist
once its module was imported, so `import outbox` imports neither SQLAlchemy's asyncio extension
(and greenlet) nor psycopg.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, scoped_session

from outbox import wake
from outbox.statements import Statement

Execute = Callable[[Statement, dict[str, Any]], None]
ExecuteAsync = Callable[[Statement, dict[str, Any]], Awaitable[None]]

SYNC_KINDS = "a SQLAlchemy Session or Connection, or a psycopg Connection"
ASYNC_KINDS = "a SQLAlchemy AsyncSession or AsyncConnection, or a psycopg AsyncConnection"


def executor(handle: Any) -> Execute:
    """How to run a statement on `handle`, a synchronous connection; TypeError for anything else."""
    if _is_sqlalchemy(handle):
        return lambda statement, params: _execute_sqlalchemy(handle, statement, params)
    if _is_psycopg(handle, "Connection"):
        _check_in_transaction(handle)
        return lambda statement, params: _execute_psycopg(handle, statement, params)
    hint = "await outbox.enqueue_async" if _is_sqlalchemy_asyncio(handle) or _is_psycopg(
        handle, "AsyncConnection") else None
    raise TypeError(_wrong_kind(handle, "enqueue", SYNC_KINDS, hint))


def async_executor(handle: Any) -> ExecuteAsync:
    """How to run a statement on `handle`, an asyncio connection; TypeError for anything else."""
    if _is_sqlalchemy_asyncio(handle):
        if isinstance(handle, sys.modules["sqlalchemy.ext.asyncio"].async_scoped_session):
            handle = handle()
        return lambda statement, params: _execute_sqlalchemy_async(handle, statement, params)
    if _is_psycopg(handle, "AsyncConnection"):
        _check_in_transaction(handle)
        return lambda statement, params: _execute_psycopg_async(handle, statement, params)
    hint = "outbox.enqueue" if _is_sqlalchemy(handle) or _is_psycopg(handle, "Connection") else None
    raise TypeError(_wrong_kind(handle, "enqueue_async", ASYNC_KINDS, hint))


def _is_sqlalchemy(handle: Any) -> bool:
    return isinstance(handle, Session | scoped_session | Connection)


def _is_sqlalchemy_asyncio(handle: Any) -> bool:
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    return module is not None and isinstance(
        handle, module.AsyncSession | module.AsyncConnection | module.async_scoped_session)


def _is_psycopg(handle: Any, class_name: str) -> bool:
    module = sys.modules.get("psycopg")
    return module is not None and isinstance(handle, getattr(module, class_name))


def _execute_sqlalchemy(handle: Session | scoped_session | Connection, statement: Statement, params: dict) -> None:
    handle.execute(statement.sqlalchemy, params)
    wake.after_commit(handle)


def _execute_psycopg(conn: Any, statement: Statement, params: dict) -> None:
    conn.execute(statement.psycopg, params)


async def _execute_sqlalchemy_async(handle: Any, statement: Statement, params: dict) -> None:
    await handle.execute(statement.sqlalchemy, params)
    await wake.after_commit_async(handle)


async def _execute_psycopg_async(conn: Any, statement: Statement, params: dict) -> None:
    await conn.execute(statement.psycopg, params)


def _check_in_transaction(conn: Any) -> None:
    """An autocommit connection outside a transaction block would commit the event on its own."""
    if conn.autocommit and conn.info.transaction_status == sys.modules["psycopg"].pq.TransactionStatus.IDLE:
        raise ValueError(
            "this psycopg connection is in autocommit mode with no transaction open, so the event would "
            "commit on its own, apart from your business data; enqueue inside `with conn.transaction():` "
            "(`async with` for an AsyncConnection) or Django's `transaction.atomic()`"
        )


def _wrong_kind(handle: Any, function: str, kinds: str, other_call: str | None) -> str:
    hint = f"; for a {type(handle).__name__} call `{other_call}(...)`" if other_call else ""
    return (f"{function} needs the connection your business data is written with: {kinds}, "
            f"got {type(handle).__name__}{hint}")
