"""A local receiver that speaks Freshpaint's `/track` API and records exactly what arrived: the tests, the
demo and the benchmarks run it in a thread to see what a worker delivered and to inject faults while it
runs, and `fp-outbox sink` runs it in the foreground for development."""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from worker.devtools.sink_http import (OK_BODY, TRACK_PATH, Answer, check_status, error_answer, fields_of,
                                       parse_event, server_for)

BURST_WINDOW_S = 1.0  # the real API's limit is per second
WAIT_POLL_S = 0.02  # wait_for polls: waking on every arrival would copy the record list 5000 times a second


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

    def public(self) -> dict[str, Any]:
        """This request as GET /_sink/events shows it: never the token itself."""
        return {"arrived_at": self.arrived_at, "status": self.status, "event": self.event,
                "insert_id": self.insert_id, "token": "***" if self.token is not None else None}


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
        check_status(self.error_status, "error_status")
        for event, status in self.reject_events.items():
            check_status(status, f"reject_events[{event!r}]")


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
        self._script: collections.deque[Answer] = collections.deque()
        self._outage: tuple[float, int] | None = None  # (time.monotonic() it ends, status)
        self._answered_ok: collections.deque[float] = collections.deque()  # 200s inside the burst window
        self._server = server_for(host, port, self)  # bound now, so `url` is known before start()
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

    def since(self, index: int) -> list[Received]:
        """The POSTs from the `index`-th on (for `fp-outbox sink --print`)."""
        with self._lock:
            return self._records[index:]

    def last(self, count: int) -> list[Received]:
        """The last `count` POSTs (for GET /_sink/events)."""
        with self._lock:
            return self._records[-count:] if count else []

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
        check_status(status, "status", reset_allowed=True)
        if count < 0 or not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"count and delay must not be negative, got count={count!r} delay={delay!r}")
        answer = Answer(status, body.encode(), "text/plain; charset=utf-8", retry_after, delay)
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
        check_status(status, "status", reset_allowed=True)
        with self._lock:
            self._outage = (time.monotonic() + seconds, status)

    # -- deciding (called from the handler threads) ------------------------------------------------
    def take(self, raw: bytes) -> Answer:
        """Decide the answer to one POST /track and record it before any sleep, so a test can see
        requests that are still waiting on their latency."""
        arrived = time.time()
        body, problem = parse_event(raw)
        event, insert_id, token = fields_of(body)
        with self._lock:
            answer = self._decide(event, problem, time.monotonic())
            self._record(Received(arrived, answer.status, event, insert_id, token, body, answer.retry_after))
        return answer

    def _decide(self, event: str | None, problem: str | None, now: float) -> Answer:
        """Rejected event names, scripted answers, outage, random reset, random error, validation, burst
        limit, then 200 after the latency. Called with the lock held."""
        faults = self._faults
        if event in faults.reject_events:
            return error_answer(faults.reject_events[event], f"event {event!r} rejected by the sink (reject_events)")
        if self._script:
            return self._script.popleft()
        if self._outage is not None and now < self._outage[0]:
            return error_answer(self._outage[1], "the sink is simulating an outage")
        if faults.reset_rate and self._random.random() < faults.reset_rate:
            return Answer(0)
        if faults.error_rate and self._random.random() < faults.error_rate:
            return error_answer(faults.error_status, "injected error (error_rate)", faults.retry_after)
        if problem is not None:
            return error_answer(400, problem)
        if faults.burst_limit and not self._admit(now, faults.burst_limit):
            return error_answer(429, f"more than {faults.burst_limit} requests in one second (burst limit)", "1")
        return Answer(200, OK_BODY, delay=faults.latency)

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
