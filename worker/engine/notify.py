"""The sd_notify protocol, spoken to systemd (or any service manager) over $NOTIFY_SOCKET.

One datagram per message on an AF_UNIX socket; a path starting with '@' names an abstract socket.
Without $NOTIFY_SOCKET every method does nothing, so the worker runs the same by hand.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping


class Notifier:
    """READY=1, WATCHDOG=1 (at most every WATCHDOG_USEC/2), STOPPING=1 and STATUS= to the service manager."""

    def __init__(self, environ: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path if path.startswith("/") else None
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self._address else None
        self._clock = clock
        self._last_watchdog: float | None = None
        self.watchdog_interval = _watchdog_interval(env) if self._socket else None

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening."""
        return self._socket is not None

    def ready(self) -> None:
        """Start-up is complete: connected and claiming."""
        self._send("READY=1")

    def watchdog(self) -> None:
        """Still alive; call it from the loop as often as you like, it sends at most every interval."""
        if self.watchdog_interval is None:
            return
        now = self._clock()
        if self._last_watchdog is None or now - self._last_watchdog >= self.watchdog_interval:
            self._last_watchdog = now
            self._send("WATCHDOG=1")

    def stopping(self) -> None:
        """Shutdown has begun."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line status shown by `systemctl status`."""
        self._send("STATUS=" + " ".join(text.split()))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError:
            pass  # the manager went away or is restarting: never a reason to stop delivering


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, when the watchdog is on and meant for this process."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
