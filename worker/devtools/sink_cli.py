"""`fp-outbox sink`: the Sink in the foreground, for development: its flags, a line per request with
--print, a summary every 5 s, and the final counts on Ctrl-C."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from typing import NoReturn

from worker.devtools.sink import Received, Sink

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
            new = sink.since(shown)
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
