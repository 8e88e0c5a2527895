"""How the admin commands reach the database and how they fail: CommandError (a message saying what to do,
and an exit status), with driver errors translated into it here, once."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from outbox.db import database_url, make_engine
from worker.engine import EXIT_READ_ONLY, DatabaseReadOnly, DatabaseRefused, DatabaseUnavailable, logs, translate


class CommandError(Exception):
    """A command could not do its job; the message says why and what to do, exit_code is the status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def connected(args: argparse.Namespace) -> Iterator[Engine]:
    """An engine on the database the worker would use; driver errors become CommandError here, once.

    With --embedded, fp-outbox's main has already put the embedded server's URL into args.database_url."""
    engine = make_engine(database_url(args.database_url))
    try:
        with translated_errors():
            yield engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Driver errors inside become CommandError: one sentence, no statement, no parameters."""
    try:
        yield
    except DBAPIError as exc:
        raise _translate(exc) from None


def _translate(exc: DBAPIError) -> CommandError:
    translated = translate(exc)
    if isinstance(translated, DatabaseRefused):
        return CommandError(str(translated), translated.exit_code)
    if isinstance(translated, DatabaseReadOnly):  # a command is run by hand: say so and stop, don't wait
        return CommandError(f"{translated}; point --database-url at the primary, or run it again once the "
                            "failover is over", EXIT_READ_ONLY)
    if isinstance(translated, DatabaseUnavailable):
        return CommandError(f"could not use the database ({translated}); check --database-url (or "
                            "FP_OUTBOX_DATABASE_URL) and that PostgreSQL is running, then try again")
    return CommandError(f"the database refused the statement ({logs.first_line(exc.orig)}); is the schema current? "
                        "run `fp-outbox migrate`")
