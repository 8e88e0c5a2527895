"""The sink's HTTP side: what a /track endpoint accepts (a JSON event with the required properties) and
answers, and the threaded HTTP/1.1 server with keep-alive that speaks it for a receiver (the Sink)."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

TRACK_PATH = "/track"
MAX_BODY_BYTES = 8 * 1024 * 1024  # far above any real event; a runaway client must not exhaust memory
DEFAULT_EVENTS_SHOWN = 20
OK_BODY = b'{"status": 1}'
REQUIRED_PROPERTIES = (("distinct_id", str, "a string"), ("token", str, "a string"), ("time", (int, float), "a number"))


@dataclass(frozen=True)
class Answer:
    """What the sink will answer one request; status 0 is a reset connection."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    retry_after: str | None = None
    delay: float = 0.0


def check_status(status: int, name: str, *, reset_allowed: bool = False) -> None:
    if not (100 <= status <= 599 or (reset_allowed and status == 0)):
        also = " or 0 to reset the connection" if reset_allowed else ""
        raise ValueError(f"{name} must be an HTTP status between 100 and 599{also}, got {status!r}")


def error_answer(status: int, message: str, retry_after: str | None = None) -> Answer:
    if status == 0:
        return Answer(0)
    return Answer(status, json.dumps({"error": message}).encode(), retry_after=retry_after)


def parse_event(raw: bytes) -> tuple[dict | None, str | None]:
    """The body if it is a JSON object, and what is wrong with it as a /track event (None if nothing)."""
    try:
        body = json.loads(raw)
    except ValueError as exc:  # includes a body that is not UTF-8
        return None, f"the body is not JSON ({exc})"
    if not isinstance(body, dict):
        return None, f"the body must be a JSON object, not {type(body).__name__}"
    if not isinstance(body.get("event"), str) or not body["event"]:
        return body, "'event' must be a non-empty string" if "event" in body else "'event' is missing"
    props = body.get("properties")
    if not isinstance(props, dict):
        return body, "'properties' must be an object" if "properties" in body else "'properties' is missing"
    for name, kind, described in REQUIRED_PROPERTIES:
        if name not in props:
            return body, f"properties.{name} is missing"
        if not isinstance(props[name], kind) or isinstance(props[name], bool):
            return body, f"properties.{name} must be {described}"
    return body, None


def fields_of(body: dict | None) -> tuple[str | None, str | None, str | None]:
    """Event name, $insert_id and token, each None unless present as a string."""
    props = body.get("properties") if body else None
    props = props if isinstance(props, dict) else {}
    event = body.get("event") if body else None
    return _text(event), _text(props.get("$insert_id")), _text(props.get("token"))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class Receiver(Protocol):
    """What the server asks of the receiver behind it (the Sink)."""

    def take(self, raw: bytes) -> Answer:
        """Decide and record the answer to one POST /track."""

    def counts(self) -> dict[str, int]:
        """For GET /_sink/stats."""

    def last(self, count: int) -> list[Any]:
        """The last `count` requests, each with a public() view, for GET /_sink/events."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: many workers connecting at once must not be refused
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sink: Receiver) -> None:
        self.sink = sink
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def opened(self, connection: socket.socket) -> None:
        with self._open_lock:
            self._open.add(connection)

    def closed(self, connection: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(connection)

    def cut_connections(self) -> None:
        """Shut down every open connection, so their handler threads see EOF and end."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-answer (killed workers, read timeouts) and connections cut by stop()
        # are this server's daily work, not errors worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def server_for(host: str, port: int, sink: Receiver) -> _Server:
    return (_Server6 if ":" in host else _Server)((host, port), sink)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a worker reuses one connection for many events
    server_version = "fp-outbox-sink"
    # Headers and body go out in separate writes; without TCP_NODELAY the body waits ~40 ms for the
    # client's delayed ACK, and a receiver that slow would hide the worker's own latency.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.closed(self.connection)

    def do_POST(self) -> None:
        raw = self._read_body()
        if raw is None:
            return
        path = urlsplit(self.path).path
        if path != TRACK_PATH:
            self._send(error_answer(404, f"nothing at {path}: POST events to {TRACK_PATH}"))
            return
        answer = self.server.sink.take(raw)
        if answer.delay:
            time.sleep(answer.delay)
        if answer.status == 0:
            self._reset()
        else:
            self._send(answer)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/_sink/stats":
            self._send_json(self.server.sink.counts())
        elif parts.path == "/_sink/events":
            self._send_events(parts.query)
        elif parts.path == TRACK_PATH:
            self._send(error_answer(405, f"{TRACK_PATH} takes POST; GET /_sink/stats or /_sink/events?limit=N"))
        else:
            self._send(error_answer(404, f"nothing at {parts.path}: GET /_sink/stats or /_sink/events?limit=N"))

    def _send_events(self, query: str) -> None:
        given = parse_qs(query).get("limit", [str(DEFAULT_EVENTS_SHOWN)])[-1]
        limit = int(given) if given.isdigit() else -1
        if limit < 0:
            self._send(error_answer(400, f"limit must be a whole number of events, got {given!r}"))
            return
        self._send_json([r.public() for r in self.server.sink.last(limit)])

    def _read_body(self) -> bytes | None:
        """The body by Content-Length, or None after answering why it cannot be read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._refuse(411, "send the body with a Content-Length; chunked bodies are not supported")
        given = self.headers.get("Content-Length") or "0"
        length = int(given) if given.strip().isdigit() else -1
        if length < 0:
            return self._refuse(400, f"Content-Length must be a whole number of bytes, got {given!r}")
        if length > MAX_BODY_BYTES:
            return self._refuse(413, f"a body of {length} bytes is over this sink's {MAX_BODY_BYTES}")
        return self.rfile.read(length)

    def _refuse(self, status: int, message: str) -> None:
        # The body stays unread, so the connection is out of step: answer, then close it.
        self.close_connection = True
        self._send(error_answer(status, message))

    def _send_json(self, payload: Any) -> None:
        self._send(Answer(200, json.dumps(payload).encode()))

    def _send(self, answer: Answer) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        if answer.retry_after is not None:
            self.send_header("Retry-After", answer.retry_after)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)

    def _reset(self) -> None:
        # Linger 0 turns close into an RST, as a crashing proxy would send; the descriptor really closes
        # when the handler drops its file objects, just after this returns.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would cost more than answering it
