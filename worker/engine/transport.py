"""The HTTP transport of the hot path: requests' own transport (urllib3) driven directly. One connection pool,
built once the way requests builds it (TLS verified with certifi, or REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE;
proxies and NO_PROXY from the environment, read once), posting with no redirect and no urllib3 retry, reading
at most READ_LIMIT bytes of any answer, and a reaper that cuts the connection of a request past its total
deadline (urllib3's read timeout applies to each recv, so a trickling answer would never time out)."""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from typing import NamedTuple

import requests
from requests.adapters import HTTPAdapter

READ_LIMIT = 8 * 1024  # bytes of an answer read at most: enough for the excerpt, whatever the endpoint sends
REAP_EVERY = 0.1  # seconds between the reaper's looks: a request may overrun its deadline by this much


class Answer(NamedTuple):
    status: int
    retry_after: str | None
    head: bytes  # the first READ_LIMIT bytes of the body at most
    truncated: bool  # the body went on past `head` (the connection was then closed, not drained)


class Transport:
    """POSTs bodies to one endpoint from many threads; `post` raises urllib3's (or the reaper's) errors."""

    def __init__(self, endpoint: str, connect_timeout: float, read_timeout: float, pool_size: int,
                 user_agent: str) -> None:
        import urllib3

        prepared = requests.Request("POST", endpoint, headers={
            "Content-Type": "application/json", "User-Agent": user_agent}).prepare()
        proxies = requests.utils.get_environ_proxies(endpoint)  # read once: requests reads them per request
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        # What HTTPAdapter.send does before each request, done once: the pool (proxy, TLS context), its
        # certificate checks, and the URL to put on the request line (absolute when through an HTTP proxy).
        self._pool = self._adapter.get_connection_with_tls_context(prepared, verify, proxies=proxies)
        self._adapter.cert_verify(self._pool, endpoint, verify, None)
        self._url = self._adapter.request_url(prepared, proxies)
        self._headers = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}  # per body
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.reaper = Reaper()
        self._pool.ConnectionCls = _watched_by(self._pool.ConnectionCls, self.reaper)

    def post(self, body: bytes, deadline: float) -> Answer:
        """POST `body`; the connection is cut at `deadline` (time.monotonic()) if the answer is not in by then."""
        self.reaper.begin(deadline)
        try:
            answer = self._pool.urlopen("POST", self._url, body=body, headers=self._headers, retries=False,
                                        redirect=False, assert_same_host=False, preload_content=False,
                                        decode_content=False, timeout=self._timeout)
            try:
                return _read(answer)
            finally:
                answer.release_conn()
        except Exception as exc:
            if self.reaper.end():
                raise _deadline_error(deadline) from exc
            raise
        finally:
            self.reaper.end()


def _read(answer) -> Answer:
    """Read at most READ_LIMIT bytes; a longer answer's connection is closed rather than drained."""
    head = answer.read(READ_LIMIT, decode_content=False)
    truncated = bool(answer.read(1, decode_content=False))  # nothing is read when the body was complete
    if truncated:
        answer.close()
    status = answer.status
    retry_after = answer.headers.get("Retry-After") if status in (429, 503) or 300 <= status < 400 else None
    return Answer(status, retry_after, head, truncated)


def _deadline_error(deadline: float) -> Exception:
    from worker.engine.policy import DeadlineExceeded

    late = time.monotonic() - deadline
    return DeadlineExceeded(f"no complete answer by the request's deadline (cut {max(0.0, late):.1f} s after it)")


class Reaper:
    """Cuts the connection of any request still running past its deadline, from a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, list] = {}  # thread id -> [deadline, connection or None, cut?]
        self._thread = threading.Thread(target=self._run, name="fp-outbox-reaper", daemon=True)
        self._thread.start()

    def begin(self, deadline: float) -> None:
        """The calling thread starts a request that must be over by `deadline`."""
        entry = [deadline, None, False]
        with self._lock:
            self._watched[threading.get_ident()] = entry

    def attach(self, connection) -> None:
        """The calling thread's request runs on `connection` (called as it connects and as it sends)."""
        entry = self._watched.get(threading.get_ident())
        if entry is not None:
            entry[1] = connection

    def end(self) -> bool:
        """The calling thread's request is over; True if the reaper cut it."""
        with self._lock:
            entry = self._watched.pop(threading.get_ident(), None)
        return entry is not None and entry[2]

    def _run(self) -> None:
        while True:
            time.sleep(REAP_EVERY)
            now = time.monotonic()
            with self._lock:
                for entry in self._watched.values():
                    if entry[0] <= now and entry[1] is not None and _cut(entry[1]):
                        entry[0], entry[2] = math.inf, True


def _cut(connection) -> bool:
    """Shut the socket down so the thread blocked on it wakes at once; False if it has none yet."""
    sock = getattr(connection, "sock", None)
    if sock is None:
        return False
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, even under TLS: no TLS state touched
    except OSError:
        pass  # already closed: the request is failing anyway
    return True


def _watched_by(connection_class: type, reaper: Reaper) -> type:
    """The pool's connection class, telling the reaper which connection the calling thread's request uses."""

    class Watched(connection_class):
        def connect(self) -> None:
            reaper.attach(self)
            super().connect()

        def request(self, *args, **kwargs):
            reaper.attach(self)
            return super().request(*args, **kwargs)

    Watched.__name__ = f"Watched{connection_class.__name__}"
    return Watched
