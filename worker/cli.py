"""`fp-outbox-worker`: the daemon's front door. Flags and --embedded, logging and signals around the delivery
engine's Worker; the one module that puts the engine and the development tools (the embedded PostgreSQL)
together."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from outbox.db import ConfigError
from worker.devtools.embedded import database_flag
from worker.engine import DatabaseRefused, Settings, StartupError, Worker, build_parser, from_args, logs

EXIT_STATUSES = """exit status:
  0  stopped by SIGTERM/SIGINT, or --drain finished
  1  the database stayed unreachable for --startup-timeout, or an unexpected error (restarting may help)
  2  bad configuration: the message says what to change
  4  the database role lacks a grant the worker needs (docs/operations.md: Database roles)
  5  the outbox schema is missing or out of date: run `fp-outbox migrate`
4 and 5 are not restarted by the systemd units (RestartPreventExitStatus): fix the cause, then restart.
A read-only database (a failover in progress) is no exit: the worker says so once and waits for a primary."""


def main(argv: list[str] | None = None) -> int:
    """Run the worker; the exit status says how it ended (EXIT_STATUSES, also in --help and docs/configuration.md)."""
    parser = build_parser()
    parser.epilog, parser.formatter_class = EXIT_STATUSES, argparse.RawDescriptionHelpFormatter
    args = parser.parse_args(argv)
    try:
        with database_flag(args) as url:
            args.database_url = url
            return _run(from_args(args))
    except ConfigError as exc:
        print(f"fp-outbox-worker: {exc}", file=sys.stderr)
        return 2


def _run(settings: Settings) -> int:
    logs.configure(settings.log_format)
    worker = Worker(settings)
    _install_signal_handlers(worker)
    try:
        return worker.run()
    except ConfigError as exc:
        return _stopped_by(str(exc), 2)
    except StartupError as exc:
        return _stopped_by(str(exc), 1)
    except DatabaseRefused as exc:
        return _stopped_by(str(exc), exc.exit_code)
    except Exception as exc:  # one line, never a traceback: SQLAlchemy's would carry statements and parameters
        return _stopped_by(f"stopped by an unexpected error ({exc.__class__.__name__}: {logs.first_line(exc)}); "
                           "it restarts under systemd; please report it", 1)


def _stopped_by(message: str, status: int) -> int:
    logs.event(logs.log, logging.ERROR, message, exit_status=status)
    return status


def _install_signal_handlers(worker) -> None:
    def first(signum, _frame) -> None:
        logs.event(logs.log, logging.INFO, "stopping: finishing or releasing in-flight events",
                   signal=signal.Signals(signum).name)
        worker.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, again)

    def again(signum, _frame) -> None:
        # A second signal means "now": the leases bring back whatever was in flight.
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, first)
