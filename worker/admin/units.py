"""`fp-outbox systemd-unit`: the systemd units shipped in this package (systemd/*.service), printed."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from worker.admin.database import CommandError

UNIT_NAMES = {False: "fp-outbox-worker.service", True: "fp-outbox-worker@.service"}
DEFAULT_EXEC_START = "/opt/fp-outbox/venv/bin/fp-outbox-worker"


def add_systemd_unit(commands) -> None:
    unit = commands.add_parser("systemd-unit", help="print the systemd unit for the worker")
    unit.add_argument("--instance", action="store_true",
                      help="the template fp-outbox-worker@.service, for several workers on one host")
    unit.add_argument("--exec-start", metavar="PATH",
                      help=f"absolute path of fp-outbox-worker (default {DEFAULT_EXEC_START})")
    unit.set_defaults(run=cmd_systemd_unit)


def unit_text(instance: bool = False, exec_start: str | None = None) -> str:
    """The shipped unit file (or the @ template), with ExecStart pointed at `exec_start` if given."""
    unit = resources.files("worker.admin").joinpath("systemd", UNIT_NAMES[instance]).read_text()
    if exec_start is None:
        return unit
    if not exec_start.startswith("/") or any(c.isspace() for c in exec_start):
        raise CommandError(f"--exec-start must be an absolute path without spaces (systemd needs one), got "
                           f"{exec_start!r}; e.g. --exec-start \"$(command -v fp-outbox-worker)\"", 2)
    return unit.replace(f"ExecStart={DEFAULT_EXEC_START}", f"ExecStart={exec_start}")


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    sys.stdout.write(unit_text(args.instance, args.exec_start))
    if args.exec_start and not Path(args.exec_start).exists():
        print(f"note: {args.exec_start} does not exist on this machine", file=sys.stderr)
    return 0
