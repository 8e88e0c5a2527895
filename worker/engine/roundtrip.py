"""Running one of the cycle's statements as a transaction of its own, in a single round trip.

Through SQLAlchemy a claim or a settle took four round trips (BEGIN, the server's limits, the statement,
COMMIT) and as much CPU in Python as in PostgreSQL. Here the limits and the statement travel as one
simple-query message, which PostgreSQL runs as one implicit transaction: the limits, set with
set_config(..., true), hold for the statement after them and end with it, so nothing stays on the session
(PgBouncer's transaction pooling sees an ordinary transaction), and the transaction is never idle waiting
for the client. The simple protocol has no parameters, so psycopg merges them into the text on this side
(a ClientCursor, quoting each value); none of them is ever the token. Nothing is prepared on the server.

The connection comes from the engine's pool, so the worker's own deadline still watches the call
(worker.engine.timeouts), and goes back to it as SQLAlchemy left it (not in autocommit); a connection that
broke is dropped from the pool. Driver errors come out as psycopg's own, for Store to translate.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import psycopg
from psycopg import pq
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.sql.elements import TextClause

from worker.engine.timeouts import with_server_limits


class Ran(NamedTuple):
    """What the statement returned (rows with named fields) and how many rows it touched."""

    rows: list[Any]
    rowcount: int


@functools.cache
def message(statement: TextClause) -> str:
    """The text sent for `statement`: the server's limits, then the statement with psycopg's placeholders."""
    return with_server_limits(str(statement.compile(dialect=psycopg_dialect())))


def run_alone(engine: Engine, statement: TextClause, params: dict[str, Any]) -> Ran:
    """Run `statement` with `params` as a transaction of its own, in one round trip; raises psycopg.Error."""
    pooled = engine.raw_connection()  # a checkout: the worker's deadline for the call is armed
    conn = pooled.driver_connection
    try:
        if conn.closed or conn.broken:  # the last call on it failed: as unavailable as a refused connect
            raise psycopg.OperationalError("the pooled database connection is closed")
        conn.autocommit = True  # else psycopg sends a BEGIN of its own first: a round trip, and a transaction to end
        cursor = psycopg.ClientCursor(conn, row_factory=namedtuple_row)
        cursor.execute(message(statement), params)
        cursor.nextset()  # past the limits' result, to the statement's
        return Ran(cursor.fetchall() if cursor.description else [], cursor.rowcount)
    finally:
        if conn.info.transaction_status == pq.TransactionStatus.IDLE:
            conn.autocommit = False  # back to the pool as SQLAlchemy expects it
        else:
            pooled.invalidate()  # broken, or cut by the deadline: never reused
        pooled.close()
