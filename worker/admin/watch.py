"""`fp-outbox status --watch`: the status figures as a live view, redrawn every second in 80 columns with
plain terminal codes (fine over ssh, no curses); q or Ctrl-C quits.

What is cheap is read every second: the queue from the partial indexes, the workers connected and the vacuum
horizon. What reads the whole table (the delivered rows and the last minute's activity, `report.figures`) is
read again only after 20 times its own last duration, so that on a large table the view never keeps the
database busy (the footer says how fresh they are)."""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable
from datetime import datetime, timezone

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from worker.admin.report import figures, holding
from worker.engine import logs, oldest_transaction, queue_figures, workers_connected

REFRESH_S = 1.0
FULL_READ_SPACING = 20  # the whole-table figures wait this many times their own duration between reads
WIDTH = 80
CLEAR, HIDE_CURSOR, SHOW_CURSOR, CLEAR_LINE = "\x1b[H\x1b[2J", "\x1b[?25l", "\x1b[?25h", "\x1b[K"


class Figures:
    """The latest figures: the cheap ones every refresh, the whole-table ones spaced by their cost."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine, self._clock = engine, clock
        self.latest: dict = {}
        self.full_read_at = self._next_full = float("-inf")
        self.full_took = 0.0
        self.error: str | None = None

    def refresh(self) -> dict:
        """Read what is due; on a database error keep the last figures and remember the error."""
        try:
            if self._clock() >= self._next_full:
                started = self._clock()
                self.latest.update(figures(self._engine))
                self.full_read_at, self.full_took = self._clock(), self._clock() - started
                self._next_full = self.full_read_at + max(REFRESH_S, FULL_READ_SPACING * self.full_took)
            else:
                self.latest.update({**queue_figures(self._engine), **oldest_transaction(self._engine),
                                    "workers_connected": workers_connected(self._engine)})
            self.error = None
        except DBAPIError as exc:
            if not self.latest:
                raise  # the first read: fail as `fp-outbox status` does
            self.error = logs.first_line(exc.orig)
        return self.latest


def watch(engine: Engine, out=sys.stdout, keys=sys.stdin) -> int:
    """Redraw the view every REFRESH_S until q or Ctrl-C; returns 0."""
    source = Figures(engine)
    interactive = out.isatty()
    with _keys(keys) as pressed:
        out.write(HIDE_CURSOR if interactive else "")
        try:
            while True:
                lines = frame(source.refresh(), source, _where(engine))
                out.write(CLEAR + "".join(line[:WIDTH] + CLEAR_LINE + "\n" for line in lines) if interactive
                          else "\n".join(lines) + "\n\n")
                out.flush()
                if pressed(REFRESH_S) in ("q", "Q"):
                    return 0
        except KeyboardInterrupt:
            return 0
        finally:
            out.write(SHOW_CURSOR if interactive else "")
            out.flush()


def frame(counts: dict, source: Figures, where: str) -> list[str]:
    """The view's lines, each at most WIDTH characters; keys absent from `counts` leave their cells out."""
    now = datetime.now(timezone.utc).strftime("%H:%M:%S UTC")
    per_s = lambda key: f"{counts[key] / 60:,.1f}/s" if key in counts else "-"  # noqa: E731
    lines = [_fit(f"fp-outbox status --watch  {where}", f"{now}  q: quit"), ""]
    lines.append(_row("rates", ("delivered", per_s("delivered_last_minute")), ("dead", per_s("dead_last_minute")),
                      ("", "(last minute)")))
    age = counts.get("oldest_pending_age_s")
    lines.append(_row("lag", ("oldest", "-" if age is None else f"{age:,.1f} s"),
                      ("overdue", _count(counts, "overdue")), ("stuck", _count(counts, "stuck"))))
    lines.append(_row("states", ("pending", _count(counts, "pending")), ("in flight", _count(counts, "in_flight")),
                      ("dead", _count(counts, "dead"))))
    lines.append(_row("", ("delivered", _count(counts, "delivered"))))
    states = [(name, str(counts[key])) for name, key in (("endpoint", "endpoint"), ("database", "database"))
              if key in counts]
    if states:
        lines.append(_row(states[0][0], ("", states[0][1]), *states[1:]))
    lines.append(_row("workers", ("", f"{_count(counts, 'workers_connected')} connected")))
    lines.append(_row("horizon", ("", holding(counts) if "oldest_transaction_age_s" in counts else "-")))
    lines += ["", _footer(source)]
    return lines


def _row(label: str, *cells: tuple[str, str]) -> str:
    """A label, then up to three cells of a name and a right-aligned value."""
    text = f"{label:<10}" + "   ".join(f"{name:<9}{value:>11}" if name else f"{value:<20}" for name, value in cells)
    return text.rstrip()


def _count(counts: dict, key: str) -> str:
    return f"{counts[key]:,}" if counts.get(key) is not None else "-"


def _fit(left: str, right: str) -> str:
    room = WIDTH - len(right) - 1
    return f"{left[:room]:<{room}} {right}"


def _footer(source: Figures) -> str:
    if source.error:
        return f"database unavailable, showing the last figures: {source.error}"[:WIDTH]
    age = time.monotonic() - source.full_read_at
    return (f"every {REFRESH_S:.0f} s; delivered counts read {age:.0f} s ago "
            f"(each read takes {source.full_took * 1000:,.0f} ms)")


def _where(engine: Engine) -> str:
    url = engine.url
    return f"{url.database}@{url.host or 'localhost'}:{url.port or 5432}"


class _keys:
    """The keys pressed at a terminal, one at a time and without Enter (cbreak mode, restored on exit);
    `pressed(timeout)` is the key or None. Not a terminal: only Ctrl-C stops the view."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._fd = stream.fileno() if stream is not None and stream.isatty() else None
        self._saved = None

    def __enter__(self) -> Callable[[float], str | None]:
        if self._fd is not None:
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self._pressed

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def _pressed(self, timeout: float) -> str | None:
        if self._fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self._fd], [], [], timeout)
        return os.read(self._fd, 1).decode(errors="replace") if ready else None
