"""The HTTP transport of the hot path: requests' own transport (urllib3) driven directly. One connection pool,
built once the way requests builds it (TLS verified with certifi, or REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE;
proxies and NO_PROXY from the environment, read once). Each sending thread keeps one of the pool's
connections, which urllib3 opens (TLS, proxy tunnel); the request and its answer go through http.client,
the layer urllib3's connections are made of, without urllib3's per-request wrapping (its Retry, Timeout and
response objects cost as much again as the HTTP itself; see docs/figures.md). No redirect is followed,
nothing is retried here, at most READ_LIMIT bytes of any answer are read, and a reaper cuts the connection
of a request past its total deadline (a read timeout applies to each recv, so a trickling answer would
never time out)."""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.proxy import connection_requires_http_tunnel
from urllib3.util.wait import wait_for_read

READ_LIMIT = 8 * 1024  # bytes of an answer read at most: enough for the excerpt, whatever the endpoint sends
REAP_EVERY = 0.1  # seconds between the reaper's looks: a request may overrun its deadline by this much


class Answer(NamedTuple):
    status: int
    retry_after: str | None
    head: bytes  # the first READ_LIMIT bytes of the body at most
    truncated: bool  # not the whole body: it went on past `head`, or was cut at the deadline (connection closed)


class NotSent(Exception):
    """Raised by a request's `writing` hook before any byte of the request was written: it was not made."""


class _FinalAnswer(http.client.HTTPResponse):
    """An answer read past every interim one. http.client skips 100 Continue only: a 103 Early Hints would be
    taken for the answer, and the real one then read as the answer to the next request on the connection."""

    def _read_status(self):
        while True:
            version, status, reason = super()._read_status()
            if status == 101:  # nothing asked to switch protocols: what follows is not HTTP/1.1 any more
                raise http.client.HTTPException("101 Switching Protocols to a request that asked for no upgrade")
            if not 100 < status < 200:
                return version, status, reason
            http.client.parse_headers(self.fp)  # an interim answer's headers; the final answer follows


class Transport:
    """POSTs bodies to one endpoint from many threads; `post` raises urllib3's (or the reaper's) errors."""

    def __init__(self, endpoint: str, connect_timeout: float, read_timeout: float, pool_size: int,
                 user_agent: str) -> None:
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
        headers = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}  # per body
        self._tunnel = connection_requires_http_tunnel(self._pool.proxy, self._pool.proxy_config, self._pool.scheme)
        if self._pool.proxy is not None and not self._tunnel:
            headers.update(self._pool.proxy_headers)  # as the pool's urlopen adds them for a forwarding proxy
        self._headers = headers
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._local = threading.local()
        self.reaper = Reaper()

    def post(self, body: bytes, deadline: float,
             writing: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Answer:
        """POST `body`; its socket is cut at `deadline` (time.monotonic()) if the answer is not in by then.
        `writing()` is entered once connected, just before the first byte of the request is written, and left
        once the request is written; it may raise NotSent to drop the request (the connection stays open)."""
        connection = self._connection()
        self.reaper.begin(deadline, connection)
        try:
            answer, head = self._exchange(connection, body, writing)
        except NotSent:
            self.reaper.end()
            raise
        except Exception as exc:
            connection.close()
            if self.reaper.end():
                raise _deadline_error(deadline) from exc
            translated = _translated(exc)
            if translated is exc:
                raise
            raise translated from exc
        whole = not self.reaper.end() and answer.isclosed() and not answer.length
        if not whole or answer.will_close:
            connection.close()  # a long answer is not drained, nor one cut at the deadline: the connection goes
        status = answer.status
        retry_after = answer.getheader("Retry-After") if status in (429, 503) or 300 <= status < 400 else None
        return Answer(status, retry_after, head, not whole)

    def _exchange(self, connection, body: bytes, writing) -> tuple[http.client.HTTPResponse, bytes]:
        """Connect if need be, write the request, read the answer's status, headers and head."""
        if connection.sock is None:
            self._connect(connection)
        # The socket itself, not the connection: an answer that closes the connection (Connection: close,
        # HTTP/1.0, no length) takes the socket over and leaves connection.sock None while it is read.
        self.reaper.watch(connection.sock)
        with writing():
            http.client.HTTPConnection.request(connection, "POST", self._url, body, self._headers)
        answer = http.client.HTTPConnection.getresponse(connection)
        # http.client closes an answer once its whole body is read; `length` is what its Content-Length
        # still promised (more than 0 if the connection ended early). Never wait for more than READ_LIMIT.
        return answer, answer.read(READ_LIMIT)

    def _connection(self):
        """This thread's connection, made by the pool with its TLS and proxy settings; dropped if the server
        closed it while idle, or sent anything unasked."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._pool._new_conn()
            connection.response_class = _FinalAnswer
        elif connection.sock is not None and not _usable(connection.sock):
            connection.close()
        return connection

    def _connect(self, connection) -> None:
        connection.timeout = self._connect_timeout
        if self._tunnel:
            self._pool._prepare_proxy(connection)  # CONNECT through the proxy, then TLS to the endpoint
        else:
            connection.connect()
        connection.sock.settimeout(self._read_timeout)


def _usable(sock) -> bool:
    """An idle connection the server neither closed nor wrote to. The pool's own check (anything to read?) takes a
    TLS 1.3 session ticket, which a connection that has not read an answer yet still holds, for a closed one."""
    if not wait_for_read(sock, timeout=0.0):
        return True
    previous = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(1)  # the end of the connection, or a byte nobody asked for: either way it cannot be used
        return False
    except (ssl.SSLWantReadError, BlockingIOError):
        return True  # TLS's own records only (a session ticket), now processed
    except OSError:
        return False
    finally:
        sock.settimeout(previous)


def _translated(exc: BaseException) -> BaseException:
    """urllib3's own errors for what http.client and the socket raise, so the policy sees one vocabulary."""
    from urllib3.exceptions import ProtocolError, ReadTimeoutError

    if isinstance(exc, socket.timeout | TimeoutError):
        return ReadTimeoutError(None, None, "read timed out")
    if isinstance(exc, http.client.HTTPException | ConnectionError):
        return ProtocolError("connection aborted", exc)
    return exc


def _deadline_error(deadline: float) -> Exception:
    from worker.engine.policy import DeadlineExceeded

    late = time.monotonic() - deadline
    return DeadlineExceeded(f"no complete answer by the request's deadline (cut {max(0.0, late):.1f} s after it)")


class _Watch:
    """One request the reaper watches: its deadline, its connection and, once it has one, its socket."""

    __slots__ = ("deadline", "connection", "sock", "cut")

    def __init__(self, deadline: float, connection) -> None:
        self.deadline, self.connection, self.sock, self.cut = deadline, connection, None, False


class Reaper:
    """Cuts the socket of any request still running past its deadline, from a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, _Watch] = {}  # thread id -> the request it is making
        self._thread = threading.Thread(target=self._run, name="fp-outbox-reaper", daemon=True)
        self._thread.start()

    def begin(self, deadline: float, connection) -> None:
        """The calling thread starts a request on `connection` that must be over by `deadline`."""
        watch = _Watch(deadline, connection)
        with self._lock:
            self._watched[threading.get_ident()] = watch

    def watch(self, sock) -> None:
        """The calling thread's request goes over `sock`: cut that, whoever holds it by then."""
        with self._lock:
            watch = self._watched.get(threading.get_ident())
            if watch is not None:
                watch.sock = sock

    def end(self) -> bool:
        """The calling thread's request is over; True if the reaper cut it."""
        with self._lock:
            watch = self._watched.pop(threading.get_ident(), None)
        return watch is not None and watch.cut

    def _run(self) -> None:
        while True:
            time.sleep(REAP_EVERY)
            now = time.monotonic()
            with self._lock:
                for watch in self._watched.values():
                    if watch.deadline <= now and _cut(watch.sock or getattr(watch.connection, "sock", None)):
                        watch.deadline, watch.cut = math.inf, True


def _cut(sock) -> bool:
    """Shut `sock` down so the thread blocked on it wakes at once; False if there is none yet."""
    if sock is None:
        return False
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, even under TLS: no TLS state touched
    except OSError:
        pass  # already closed: the request is failing anyway
    return True
