"""`fp-outbox-worker`: the daemon's front door. Flags and --embedded, logging and signals around the delivery
engine's Worker; the one module that puts the engine and the development tools (the embedded PostgreSQL)
together."""

from __future__ import annotations

import logging
import os
import signal
import sys

from outbox.db import ConfigError
from worker.devtools.embedded import database_flag
from worker.engine import Settings, StartupError, Worker, build_parser, from_args, logs


def main(argv: list[str] | None = None) -> int:
    """Run the worker; exit 2 on bad configuration, 1 if the database never answered, 0 otherwise."""
    args = build_parser().parse_args(argv)
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
        logs.event(logs.log, logging.ERROR, str(exc))
        return 2
    except StartupError as exc:
        logs.event(logs.log, logging.ERROR, str(exc))
        return 1


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
