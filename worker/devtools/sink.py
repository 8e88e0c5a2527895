"""A local receiver that speaks Freshpaint's `/track` API and records exactly what arrived: the tests, the
demo and the benchmarks run it in a thread to see what a worker delivered and to inject faults while it
runs, and `fp-outbox sink` runs it in the foreground for development."""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

TRACK_PATH = "/track"
BURST_WINDOW_S = 1.0  # the real API's limit is per second
MAX_BODY_BYTES = 8 * 1024 * 1024  # far above any real event; a runaway client must not exhaust memory
DEFAULT_EVENTS_SHOWN = 20
WAIT_POLL_S = 0.02  # wait_for polls: waking on every arrival would copy the record list 5000 times a second
OK_BODY = b'{"status": 1}'
REQUIRED_PROPERTIES = (("distinct_id", str, "a string"), ("token", str, "a string"), ("time", (int, float), "a number"))


class _Unset:
    """Marks a set_faults() argument not passed, for the settings where None means "clear"."""


UNSET = _Unset()


@dataclass(frozen=True)
class Received:
    """One POST /track as the sink saw and answered it."""

    arrived_at: float  # time.time() when the request was read
    status: int  # what the sink answered; 0 if it reset the connection
    event: str | None
    insert_id: str | None  # properties["$insert_id"]
    token: str | None  # properties["token"]
    body: dict | None  # the parsed JSON body; None if it was not a JSON object
    retry_after: str | None = None  # the Retry-After the sink answered with, if any


@dataclass(frozen=True)
class _Answer:
    """What the sink will answer one request; status 0 is a reset connection."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    retry_after: str | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class _Faults:
    """The behaviour set_faults() steers; replaced whole, so a decision never sees half an update."""

    latency: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    retry_after: str | None = None
    reset_rate: float = 0.0
    burst_limit: int | None = 5000
    reject_events: dict[str, int] = field(default_factory=dict)  # event name -> status, before anything else

    def check(self) -> None:
        """Raise ValueError naming the first setting that makes no sense."""
        for name in ("error_rate", "reset_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a fraction between 0 and 1, got {getattr(self, name)!r}")
        if not (math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError(f"latency is seconds, not negative, got {self.latency!r}")
        if self.burst_limit is not None and self.burst_limit < 0:
            raise ValueError(f"burst_limit is requests per second (None or 0: no limit), got {self.burst_limit!r}")
        _check_status(self.error_status, "error_status")
        for event, status in self.reject_events.items():
            _check_status(status, f"reject_events[{event!r}]")


class Sink:
    """A /track receiver serving from a background daemon thread; every method is thread-safe."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, burst_limit: int | None = 5000,
                 latency: float = 0.0, error_rate: float = 0.0, error_status: int = 503,
                 seed: int | None = None) -> None:
        self._faults = _Faults(latency=latency, error_rate=error_rate, error_status=error_status,
                               burst_limit=burst_limit or None)
        self._faults.check()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._records: list[Received] = []
        self._tally: collections.Counter[str] = collections.Counter()
        self._accepted_ids: set[str] = set()
        self._script: collections.deque[_Answer] = collections.deque()
        self._outage: tuple[float, int] | None = None  # (time.monotonic() it ends, status)
        self._answered_ok: collections.deque[float] = collections.deque()  # 200s inside the burst window
        self._server = _server_for(host, port, self)  # bound now, so `url` is known before start()
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        """The /track URL on the port actually bound."""
        host, port = self._server.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{TRACK_PATH}"

    def start(self) -> Sink:
        """Serve in a background daemon thread; returns self."""
        if self._stopped:
            raise RuntimeError("this Sink was stopped and its socket closed; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="fp-outbox-sink", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections and close the socket; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        # Idle keep-alive connections would otherwise keep their handler threads answering after stop.
        self._server.cut_connections()
        self._server.server_close()

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what arrived ------------------------------------------------------------------------------
    def received(self) -> list[Received]:
        """Every POST /track so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._records)

    def accepted(self) -> list[Received]:
        """The POSTs answered 2xx."""
        return [r for r in self.received() if 200 <= r.status < 300]

    def counts(self) -> dict[str, int]:
        """Requests, accepted, distinct $insert_ids among accepted, duplicates and rejected (incl. resets).

        An accepted event without a $insert_id counts as distinct: nothing could drop it as a duplicate."""
        with self._lock:
            tally, distinct = self._tally, len(self._accepted_ids) + self._tally["accepted_without_id"]
            return {"requests": tally["requests"], "accepted": tally["accepted"], "distinct_insert_ids": distinct,
                    "duplicates": tally["accepted"] - distinct, "rejected": tally["rejected"]}

    def wait_for(self, predicate: Callable[[Sink], object], timeout: float) -> bool:
        """Poll predicate(self) until it is true (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(WAIT_POLL_S, remaining))
        return True

    def clear(self) -> None:
        """Forget what was received and the counts; scripted answers and faults stay."""
        with self._lock:
            self._records.clear()
            self._tally.clear()
            self._accepted_ids.clear()

    # -- steering ----------------------------------------------------------------------------------
    def answer_next(self, status: int, count: int = 1, *, retry_after: str | None = None, body: str = "",
                    delay: float = 0.0) -> None:
        """Script the next `count` POSTs ahead of every other fault: this status (0: reset the connection
        unanswered), Retry-After and body text, after sleeping `delay` seconds."""
        _check_status(status, "status", reset_allowed=True)
        if count < 0 or not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"count and delay must not be negative, got count={count!r} delay={delay!r}")
        answer = _Answer(status, body.encode(), "text/plain; charset=utf-8", retry_after, delay)
        with self._lock:
            self._script.extend([answer] * count)

    def set_faults(self, *, latency: float | None = None, error_rate: float | None = None,
                   error_status: int | None = None, retry_after: str | None | _Unset = UNSET,
                   reset_rate: float | None = None, burst_limit: int | None | _Unset = UNSET,
                   reject_events: dict[str, int] | None | _Unset = UNSET) -> None:
        """Change behaviour while a worker runs. None leaves a numeric setting as it is; retry_after,
        burst_limit and reject_events are left alone unless passed, and passing None clears them."""
        given = {"latency": latency, "error_rate": error_rate, "error_status": error_status,
                 "reset_rate": reset_rate, "retry_after": retry_after, "burst_limit": burst_limit,
                 "reject_events": reject_events}
        clearable = {"retry_after", "burst_limit", "reject_events"}
        changes = {k: v for k, v in given.items() if not isinstance(v, _Unset) and (v is not None or k in clearable)}
        if "burst_limit" in changes:
            changes["burst_limit"] = changes["burst_limit"] or None
        if "reject_events" in changes:
            changes["reject_events"] = dict(changes["reject_events"] or {})
        with self._lock:
            updated = replace(self._faults, **changes)
            updated.check()
            self._faults = updated

    def outage(self, seconds: float, status: int = 503) -> None:
        """Answer every POST `status` (0: reset) for the next `seconds`; outage(0) ends one early."""
        _check_status(status, "status", reset_allowed=True)
        with self._lock:
            self._outage = (time.monotonic() + seconds, status)

    # -- deciding (called from the handler threads) ------------------------------------------------
    def _take(self, raw: bytes) -> _Answer:
        """Decide the answer to one POST /track and record it before any sleep, so a test can see
        requests that are still waiting on their latency."""
        arrived = time.time()
        body, problem = _parse_event(raw)
        event, insert_id, token = _fields_of(body)
        with self._lock:
            answer = self._decide(event, problem, time.monotonic())
            self._record(Received(arrived, answer.status, event, insert_id, token, body, answer.retry_after))
        return answer

    def _decide(self, event: str | None, problem: str | None, now: float) -> _Answer:
        """Rejected event names, scripted answers, outage, random reset, random error, validation, burst
        limit, then 200 after the latency. Called with the lock held."""
        faults = self._faults
        if event in faults.reject_events:
            return _error(faults.reject_events[event], f"event {event!r} rejected by the sink (reject_events)")
        if self._script:
            return self._script.popleft()
        if self._outage is not None and now < self._outage[0]:
            return _error(self._outage[1], "the sink is simulating an outage")
        if faults.reset_rate and self._random.random() < faults.reset_rate:
            return _Answer(0)
        if faults.error_rate and self._random.random() < faults.error_rate:
            return _error(faults.error_status, "injected error (error_rate)", faults.retry_after)
        if problem is not None:
            return _error(400, problem)
        if faults.burst_limit and not self._admit(now, faults.burst_limit):
            return _error(429, f"more than {faults.burst_limit} requests in one second (burst limit)", "1")
        return _Answer(200, OK_BODY, delay=faults.latency)

    def _admit(self, now: float, limit: int) -> bool:
        """Whether one more 200 fits in the trailing window; counts it if so. Called with the lock held."""
        window = self._answered_ok
        while window and window[0] <= now - BURST_WINDOW_S:
            window.popleft()
        if len(window) >= limit:
            return False
        window.append(now)
        return True

    def _record(self, item: Received) -> None:
        """Append and count one request. Called with the lock held."""
        self._records.append(item)
        self._tally["requests"] += 1
        if not 200 <= item.status < 300:
            self._tally["rejected"] += 1
            return
        self._tally["accepted"] += 1
        if item.insert_id is None:
            self._tally["accepted_without_id"] += 1
        else:
            self._accepted_ids.add(item.insert_id)

    def _since(self, index: int) -> list[Received]:
        with self._lock:
            return self._records[index:]

    def _last(self, count: int) -> list[Received]:
        with self._lock:
            return self._records[-count:] if count else []


def _check_status(status: int, name: str, *, reset_allowed: bool = False) -> None:
    if not (100 <= status <= 599 or (reset_allowed and status == 0)):
        also = " or 0 to reset the connection" if reset_allowed else ""
        raise ValueError(f"{name} must be an HTTP status between 100 and 599{also}, got {status!r}")


def _error(status: int, message: str, retry_after: str | None = None) -> _Answer:
    if status == 0:
        return _Answer(0)
    return _Answer(status, json.dumps({"error": message}).encode(), retry_after=retry_after)


def _parse_event(raw: bytes) -> tuple[dict | None, str | None]:
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


def _fields_of(body: dict | None) -> tuple[str | None, str | None, str | None]:
    """Event name, $insert_id and token, each None unless present as a string."""
    props = body.get("properties") if body else None
    props = props if isinstance(props, dict) else {}
    event = body.get("event") if body else None
    return _text(event), _text(props.get("$insert_id")), _text(props.get("token"))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _public(item: Received) -> dict[str, Any]:
    """One record as GET /_sink/events shows it: never the token itself."""
    return {"arrived_at": item.arrived_at, "status": item.status, "event": item.event,
            "insert_id": item.insert_id, "token": "***" if item.token is not None else None}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: many workers connecting at once must not be refused
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sink: Sink) -> None:
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


def _server_for(host: str, port: int, sink: Sink) -> _Server:
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
            self._send(_error(404, f"nothing at {path}: POST events to {TRACK_PATH}"))
            return
        answer = self.server.sink._take(raw)
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
            self._send(_error(405, f"{TRACK_PATH} takes POST; GET /_sink/stats or /_sink/events?limit=N"))
        else:
            self._send(_error(404, f"nothing at {parts.path}: GET /_sink/stats or /_sink/events?limit=N"))

    def _send_events(self, query: str) -> None:
        given = parse_qs(query).get("limit", [str(DEFAULT_EVENTS_SHOWN)])[-1]
        limit = int(given) if given.isdigit() else -1
        if limit < 0:
            self._send(_error(400, f"limit must be a whole number of events, got {given!r}"))
            return
        self._send_json([_public(r) for r in self.server.sink._last(limit)])

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
        self._send(_error(status, message))

    def _send_json(self, payload: Any) -> None:
        self._send(_Answer(200, json.dumps(payload).encode()))

    def _send(self, answer: _Answer) -> None:
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


# -- `fp-outbox sink` ------------------------------------------------------------------------------
SUMMARY_EVERY_S = 5.0
PRINT_EVERY_S = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `fp-outbox sink`."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080; 0: any free)")
    parser.add_argument("--burst-limit", type=int, default=5000,
                        help="answer 429 past this many accepted requests in the trailing second, like the "
                             "real API (default: 5000; 0: no limit)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="wait this long before each 200 (default: 0)")
    parser.add_argument("--error-rate", type=float, default=0.0,
                        help="fraction of requests answered --error-status, 0 to 1 (default: 0)")
    parser.add_argument("--error-status", type=int, default=503, help="status for --error-rate (default: 503)")
    parser.add_argument("--reset-rate", type=float, default=0.0,
                        help="fraction of requests whose connection is reset unanswered, 0 to 1 (default: 0)")
    parser.add_argument("--print", action="store_true",
                        help="print one line per request: time, status, event name, $insert_id")


def run(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGINT or SIGTERM, then print the final counts and return 0."""
    _check_flags(args)
    try:
        sink = Sink(args.host, args.port, burst_limit=args.burst_limit or None, latency=args.latency_ms / 1000,
                    error_rate=args.error_rate, error_status=args.error_status)
    except OSError as exc:
        _fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
              "choose another --port (0 picks a free one) or stop what is using it")
    sink.set_faults(reset_rate=args.reset_rate)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with sink:
            print(f"fp-outbox sink: POST events to {sink.url}  (GET /_sink/stats, /_sink/events?limit=N)")
            print("Ctrl-C to stop", flush=True)
            _report_until(stop, sink, args.print)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"final: {_summary(sink.counts())}", flush=True)
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Exit 2 with a message naming the first flag that makes no sense and what to give instead."""
    checks = [
        (0 <= args.port <= 65535, "--port", args.port, "a port between 0 and 65535 (0 picks a free one)"),
        (args.burst_limit >= 0, "--burst-limit", args.burst_limit, "requests per second, or 0 for no limit"),
        (math.isfinite(args.latency_ms) and args.latency_ms >= 0, "--latency-ms", args.latency_ms,
         "milliseconds, 0 or more"),
        (0 <= args.error_rate <= 1, "--error-rate", args.error_rate, "a fraction between 0 and 1 (0.1: one in ten)"),
        (400 <= args.error_status <= 599, "--error-status", args.error_status, "an HTTP error status, 400 to 599"),
        (0 <= args.reset_rate <= 1, "--reset-rate", args.reset_rate, "a fraction between 0 and 1 (0.1: one in ten)"),
    ]
    for ok, flag, value, wanted in checks:
        if not ok:
            _fail(f"{flag} {value} makes no sense: give {wanted}")


def _fail(message: str) -> NoReturn:
    print(f"fp-outbox sink: {message}", file=sys.stderr)
    raise SystemExit(2)


def _report_until(stop: threading.Event, sink: Sink, print_each: bool) -> None:
    """Print each request (with --print) and, every 5 s while something changed, a summary line."""
    shown, last = 0, sink.counts()
    next_summary = time.monotonic() + SUMMARY_EVERY_S
    while not stop.wait(PRINT_EVERY_S):
        if print_each:
            new = sink._since(shown)
            for item in new:
                print(_line(item))
            shown += len(new)
        if time.monotonic() >= next_summary:
            next_summary = time.monotonic() + SUMMARY_EVERY_S
            counts = sink.counts()
            if counts != last:
                print(_summary(counts))
                last = counts
        sys.stdout.flush()


def _line(item: Received) -> str:
    """One request for --print; the token is never part of it."""
    clock = time.strftime("%H:%M:%S", time.localtime(item.arrived_at)) + f".{int(item.arrived_at % 1 * 1000):03d}"
    return f"{clock}  {item.status or 'reset':>5}  {item.event or '-'}  {item.insert_id or '-'}"


def _summary(counts: dict[str, int]) -> str:
    return "  ".join(f"{key}={value}" for key, value in counts.items())
