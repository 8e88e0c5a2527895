"""The confirmation prompt of the commands that change rows (requeue, purge): --yes, or a 'y' at a terminal."""

from __future__ import annotations

import argparse
import sys

from worker.admin.database import CommandError


def confirm(action: str, note: str, args: argparse.Namespace) -> None:
    """Go ahead with --yes, or on a 'y' typed at a terminal; otherwise stop with what to do."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CommandError(f"{action}: no terminal to confirm on, so nothing was changed; "
                           "pass --yes to go ahead (or --dry-run to only count)", 2)
    print(f"{action}? {note} [y/N] ".replace("  ", " "), end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise CommandError("cancelled; nothing was changed", 1)
