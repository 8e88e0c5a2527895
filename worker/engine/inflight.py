"""The sends in flight: sending threads that take claimed rows from one queue and put their outcomes on
another, from which the settler collects them, and which rows are still being sent. Closing it is the line
after which no request starts for any row it holds (those rows are then released)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from worker.engine.metrics import Metrics
from worker.engine.policy import Outcome, classify_exception
from worker.engine.store import Claimed
from worker.engine.tracing import OFF, Tracing

# send(row, lease_ends, may_start) -> the outcome, or None when no request started because the row was let go
Send = Callable[[Claimed, float, Callable[[], bool]], Outcome | None]


class InFlight:
    """This worker's sends in progress; len() is how many. Only the loop's thread calls its methods."""

    def __init__(self, send: Send, concurrency: int, metrics: Metrics, tracing: Tracing = OFF) -> None:
        self._send = send
        self._metrics = metrics
        self._tracing = tracing  # a span per delivery attempt
        self._rows: dict[int, Claimed] = {}
        self._work: queue.SimpleQueue[tuple[Claimed, float] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Claimed, Outcome]] = queue.SimpleQueue()
        self._gate = threading.Lock()
        self._open = True
        # Daemon threads: a request hanging on a dead endpoint must never keep the process from exiting.
        self._threads = [threading.Thread(target=self._serve, name=f"fp-outbox-send-{n}", daemon=True)
                         for n in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def __len__(self) -> int:
        return len(self._rows)

    def start(self, row: Claimed, lease_ends: float) -> None:
        """Send `row` on a sending thread, all of it before `lease_ends` (time.monotonic()); its outcome comes
        back through finished()."""
        self._rows[row.id] = row
        self._work.put((row, lease_ends))

    def finished(self, timeout: float) -> list[tuple[Claimed, Outcome]]:
        """Every send finished by now, waiting up to `timeout` seconds for the first (0: not at all)."""
        try:
            first = self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait()
        except queue.Empty:
            return []
        results = [first]
        while True:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                break
        for row, _ in results:
            del self._rows[row.id]
        return results

    def rows(self) -> list[Claimed]:
        """The rows whose sends have not finished (or whose outcomes were not collected yet)."""
        return list(self._rows.values())

    def close(self) -> None:
        """From now on no request starts for any row held here; sending threads end as their sends do."""
        with self._gate:
            self._open = False
        for _ in self._threads:
            self._work.put(None)

    def _may_start(self) -> bool:
        with self._gate:
            return self._open

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            row, lease_ends = item
            started = time.perf_counter()
            with self._tracing.attempt(row) as span:
                try:
                    outcome = self._send(row, lease_ends, self._may_start)
                except Exception as exc:  # send() should never raise; if it does, the row is dead, not stuck
                    outcome = classify_exception(exc)
                span.finish(outcome)
            if outcome is not None:  # None: nothing was sent, the row was released as it was
                self._metrics.observe_send(time.perf_counter() - started)
                self._done.put((row, outcome))
