"""The sends in flight: a pool of sending threads, which claimed row each send serves, and the queue of
those that finished, from which the settler collects their outcomes."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from worker.engine.metrics import Metrics
from worker.engine.policy import Outcome
from worker.engine.store import Claimed


class InFlight:
    """This worker's sends in progress; len() is how many."""

    def __init__(self, send: Callable[[Claimed], Outcome], concurrency: int, metrics: Metrics) -> None:
        self._send = send
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="fp-outbox-send")
        self._running: dict[Future, Claimed] = {}
        self._done: queue.SimpleQueue[Future] = queue.SimpleQueue()

    def __len__(self) -> int:
        return len(self._running)

    def start(self, row: Claimed) -> None:
        """Send `row` on the pool; its outcome comes back through finished()."""
        future = self._pool.submit(self._timed_send, row)
        self._running[future] = row
        future.add_done_callback(self._done.put)

    def finished(self, timeout: float) -> list[tuple[Claimed, Outcome]]:
        """Every send finished by now, waiting up to `timeout` seconds for the first (0: not at all)."""
        try:
            future = self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait()
        except queue.Empty:
            return []
        results = []
        while True:
            results.append((self._running.pop(future), future.result()))  # Sender.send never raises
            try:
                future = self._done.get_nowait()
            except queue.Empty:
                return results

    def rows(self) -> list[Claimed]:
        """The rows whose sends have not finished."""
        return list(self._running.values())

    def close(self) -> None:
        """Stop the pool without waiting; sends not yet begun are cancelled (their rows were released)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _timed_send(self, row: Claimed) -> Outcome:
        started = time.perf_counter()
        try:
            return self._send(row)
        finally:
            self._metrics.observe_send(time.perf_counter() - started)
