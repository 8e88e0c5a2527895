"""The sends in flight: sending threads that take claimed rows from one queue and put their outcomes on
another, from which the settler collects them, and which rows are still being sent. Its gate is the line after
which no request is written for any row it holds: closing it waits out the writes in progress, so a row is
released only once no byte of its request can follow."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator

from worker.engine.metrics import Metrics
from worker.engine.policy import Outcome, classify_exception
from worker.engine.store import Claimed
from worker.engine.tracing import OFF, Tracing
from worker.engine.transport import NotSent

# send(row, lease_ends, gate, slice_ends) -> the outcome, or None when no request was made because the row
# was let go (times are time.monotonic(): the lease's end, and the end of the rate slice its request starts in)
Send = Callable[[Claimed, float, "Gate", float], Outcome | None]


class Released(NotSent):
    """The gate is closed: the worker let the row go, and no request for it may be written any more."""


class Gate:
    """Open until closed. A request is written only inside writing(), which refuses once the gate is closed;
    close() waits for the writes in progress, so "released" and "being written" never hold for one row."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._writing: set[int] = set()  # rows whose request is being written right now

    def is_open(self) -> bool:
        """A cheap look (before connecting, say); only writing() decides."""
        return self._open

    @contextlib.contextmanager
    def writing(self, row_id: int) -> Iterator[None]:
        """Write `row_id`'s request inside this; raises Released if the gate is closed."""
        with self._cond:
            if not self._open:
                raise Released("not sent: the worker is stopping and released the row")
            self._writing.add(row_id)
        try:
            yield
        finally:
            with self._cond:
                self._writing.discard(row_id)
                self._cond.notify_all()

    def close(self, wait: float) -> set[int]:
        """Close the gate and wait up to `wait` seconds for the writes in progress (they take microseconds, unless
        a peer stopped reading); returns the rows still being written then, which must not be released."""
        with self._cond:
            self._open = False
            self._cond.wait_for(lambda: not self._writing, wait)
            return set(self._writing)


class InFlight:
    """This worker's sends in progress; len() is how many. Only the loop's thread calls its methods."""

    def __init__(self, send: Send, concurrency: int, metrics: Metrics, tracing: Tracing = OFF) -> None:
        self._send = send
        self._metrics = metrics
        self._tracing = tracing  # a span per delivery attempt
        self._rows: dict[int, Claimed] = {}
        self._work: queue.SimpleQueue[tuple[Claimed, float, float] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Claimed, Outcome]] = queue.SimpleQueue()
        self.gate = Gate()
        # Daemon threads: a request hanging on a dead endpoint must never keep the process from exiting.
        self._threads = [threading.Thread(target=self._serve, name=f"fp-outbox-send-{n}", daemon=True)
                         for n in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def __len__(self) -> int:
        return len(self._rows)

    def start(self, row: Claimed, lease_ends: float, slice_ends: float) -> None:
        """Send `row` on a sending thread, all of it before `lease_ends`, its request starting before `slice_ends`
        (or in a slice of its own taken later); its outcome comes back through finished()."""
        self._rows[row.id] = row
        self._work.put((row, lease_ends, slice_ends))

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

    def close(self, wait: float) -> set[int]:
        """From now on no request is written for any row held here (the gate: see Gate.close, which returns the
        rows still being written after `wait` seconds); sending threads end as their sends do."""
        writing = self.gate.close(wait)
        for _ in self._threads:
            self._work.put(None)
        return writing

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            row, lease_ends, slice_ends = item
            started = time.perf_counter()
            with self._tracing.attempt(row) as span:
                try:
                    outcome = self._send(row, lease_ends, self.gate, slice_ends)
                except Exception as exc:  # send() should never raise; if it does, the row is dead, not stuck
                    outcome = classify_exception(exc)
                span.finish(outcome)
            if outcome is not None:  # None: nothing was sent, the row was released as it was
                self._metrics.observe_send(time.perf_counter() - started)
                self._done.put((row, outcome))
