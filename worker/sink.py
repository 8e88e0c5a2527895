"""A local receiver that speaks Freshpaint's `/track` API: for development (`fp-outbox sink`), the demo
and the tests, which record what arrived and inject faults while a worker runs."""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Received:
    arrived_at: float  # time.time() when the request was read
    status: int  # what the sink answered; 0 for a reset connection
    event: str | None
    insert_id: str | None
    token: str | None
    body: dict | None
    retry_after: str | None = None  # the Retry-After the sink answered with, if any


@dataclass(frozen=True)
class _Answer:
    status: int
    retry_after: str | None = None
    body: str = ""
    delay: float = 0.0


class Sink:
    """A /track receiver on 127.0.0.1 in a background thread; thread-safe to inspect and steer."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, burst_limit: int | None = 5000,
                 latency: float = 0.0, error_rate: float = 0.0, error_status: int = 503,
                 seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._script: collections.deque[_Answer] = collections.deque()
        self._recent_ok: collections.deque[float] = collections.deque()
        self._random = random.Random(seed)
        self._faults = {"latency": latency, "error_rate": error_rate, "error_status": error_status,
                        "retry_after": None, "reset_rate": 0.0, "burst_limit": burst_limit,
                        "reject_events": {}}
        self._outage: tuple[float, int] | None = None
        self._server = _Server((host, port), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/track"

    def start(self) -> Sink:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fp-outbox-sink", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspecting ----------------------------------------------------------------------------
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def accepted(self) -> list[Received]:
        return [r for r in self.received() if 200 <= r.status < 300]

    def counts(self) -> dict[str, int]:
        received = self.received()
        accepted = [r for r in received if 200 <= r.status < 300]
        distinct = len({r.insert_id for r in accepted})
        return {"requests": len(received), "accepted": len(accepted), "distinct_insert_ids": distinct,
                "duplicates": len(accepted) - distinct, "rejected": len(received) - len(accepted)}

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return bool(predicate(self))

    def clear(self) -> None:
        with self._lock:
            self._received.clear()

    # -- steering ------------------------------------------------------------------------------
    def answer_next(self, status: int, count: int = 1, *, retry_after: str | None = None, body: str = "",
                    delay: float = 0.0) -> None:
        """The next `count` POSTs get this answer; status 0 resets the connection instead."""
        with self._lock:
            self._script.extend([_Answer(status, retry_after, body, delay)] * count)

    def set_faults(self, **changes: Any) -> None:
        """Change latency, error_rate, error_status, retry_after, reset_rate, burst_limit or
        reject_events ({event name: status}) while running."""
        unknown = set(changes) - set(self._faults)
        if unknown:
            raise TypeError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        with self._lock:
            self._faults.update(changes)

    def outage(self, seconds: float, status: int = 503) -> None:
        with self._lock:
            self._outage = (time.monotonic() + seconds, status)

    # -- deciding (called by the handler) ------------------------------------------------------
    def decide(self, event: str | None = None) -> tuple[_Answer, float]:
        """The answer to the next POST, in order: rejected event names, script, outage, reset,
        error rate, burst limit."""
        with self._lock:
            faults = self._faults
            latency = faults["latency"]
            if event in faults["reject_events"]:
                status = faults["reject_events"][event]
                return _Answer(status, body=json.dumps({"error": f"event {event!r} rejected by the sink"})), 0.0
            if self._script:
                return self._script.popleft(), 0.0
            now = time.monotonic()
            if self._outage and now < self._outage[0]:
                return _Answer(self._outage[1]), 0.0
            if faults["reset_rate"] and self._random.random() < faults["reset_rate"]:
                return _Answer(0), 0.0
            if faults["error_rate"] and self._random.random() < faults["error_rate"]:
                return _Answer(faults["error_status"], faults["retry_after"]), 0.0
            limit = faults["burst_limit"]
            if limit:
                while self._recent_ok and self._recent_ok[0] <= now - 1.0:
                    self._recent_ok.popleft()
                if len(self._recent_ok) >= limit:
                    return _Answer(429, "1", '{"error": "rate limit exceeded"}'), 0.0
                self._recent_ok.append(now)
            return _Answer(200, body='{"status": 1}'), latency

    def record(self, item: Received) -> None:
        with self._lock:
            self._received.append(item)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # A client that dies mid-request (a killed worker) is expected here, not an error to print.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(sink: Sink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes; without TCP_NODELAY the body waits ~40 ms for
        # the client's delayed ACK, and a receiver that slow would hide the worker's own latency.
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            if urlsplit(self.path).path != "/track":
                self._reply(404, {"error": f"no such endpoint {self.path}; POST events to /track"})
                return
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            arrived = time.time()
            body, problem = _parse(raw)
            answer, latency = sink.decide(body.get("event") if isinstance(body, dict) else None)
            if problem and answer.status == 200:
                answer = _Answer(400, body=json.dumps({"error": problem}))
            props = (body or {}).get("properties") if isinstance(body, dict) else None
            props = props if isinstance(props, dict) else {}
            sink.record(Received(arrived, answer.status, (body or {}).get("event") if isinstance(body, dict) else None,
                                 props.get("$insert_id"), props.get("token"), body if isinstance(body, dict) else None,
                                 answer.retry_after))
            time.sleep(answer.delay or latency)
            if answer.status == 0:
                self._reset()
                return
            headers = {"Retry-After": answer.retry_after} if answer.retry_after else {}
            self._reply(answer.status, answer.body or "", headers)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path == "/_sink/stats":
                self._reply(200, sink.counts())
            elif parts.path == "/_sink/events":
                limit = int(parse_qs(parts.query).get("limit", ["20"])[0])
                recent = sink.received()[-limit:]
                self._reply(200, [{"arrived_at": r.arrived_at, "status": r.status, "event": r.event,
                                   "insert_id": r.insert_id, "token": "***" if r.token else None} for r in recent])
            else:
                self._reply(404, {"error": "GET /_sink/stats or /_sink/events?limit=N; POST events to /track"})

        def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _reset(self) -> None:
            # SO_LINGER 0: close sends RST, as a crashing proxy would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def _parse(raw: bytes) -> tuple[Any, str | None]:
    """The body and what is wrong with it as a /track event (None when it is fine)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None, "the body is not JSON"
    if not isinstance(body, dict) or not isinstance(body.get("event"), str):
        return body, "the body must be an object with a string 'event'"
    props = body.get("properties")
    if not isinstance(props, dict):
        return body, "'properties' must be an object"
    for field in ("distinct_id", "token", "time"):
        if field not in props:
            return body, f"properties.{field} is required"
    return body, None


# -- `fp-outbox sink` ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--burst-limit", type=int, default=5000, help="answer 429 past this many requests/s (0: none)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay every 200 answer")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered --error-status")
    parser.add_argument("--error-status", type=int, default=503)
    parser.add_argument("--reset-rate", type=float, default=0.0, help="fraction of connections reset unanswered")
    parser.add_argument("--print", action="store_true", help="print one line per received event")


def run(args: argparse.Namespace) -> int:
    for name in ("error_rate", "reset_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise SystemExit(f"fp-outbox sink: --{name.replace('_', '-')} must be between 0 and 1")
    if args.latency_ms < 0 or args.burst_limit < 0:
        raise SystemExit("fp-outbox sink: --latency-ms and --burst-limit must not be negative")
    sink = Sink(args.host, args.port, burst_limit=args.burst_limit or None, latency=args.latency_ms / 1000,
                error_rate=args.error_rate, error_status=args.error_status)
    sink.set_faults(reset_rate=args.reset_rate)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with sink:
        print(f"fp-outbox sink: listening on {sink.url} (stats: GET /_sink/stats); Ctrl-C to stop", flush=True)
        shown, last = 0, None
        while not stop.wait(0.5 if args.print else 5.0):
            if args.print:
                received = sink.received()
                for r in received[shown:]:
                    print(f"{time.strftime('%H:%M:%S', time.localtime(r.arrived_at))} {r.status} "
                          f"{r.event} {r.insert_id}", flush=True)
                shown = len(received)
            counts = sink.counts()
            if counts != last and not args.print:
                print(_summary(counts), flush=True)
                last = counts
    print(_summary(sink.counts()), flush=True)
    return 0


def _summary(counts: dict[str, int]) -> str:
    return " ".join(f"{key}={value}" for key, value in counts.items())
