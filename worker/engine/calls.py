"""What the Store's database calls cost and did: each one timed by kind into fp_outbox_database_call_seconds,
and the claim and settle statements traced (worker.engine.tracing)."""

from __future__ import annotations

import time
from typing import Any

from worker.engine import queries
from worker.engine.metrics import Metrics
from worker.engine.tracing import OFF, Tracing

# Each statement's kind of call (the metric's `call` label) and its detail (on the span): a statement not
# named here is timed as "other" and not traced.
KINDS: dict[int, tuple[str, str]] = {
    id(queries.CLAIM_FRESH): ("claim", "fresh"),
    id(queries.CLAIM_DUE): ("claim", "due"),
    id(queries.SETTLE_FRESH): ("settle", "fresh"),
    id(queries.SETTLE_FRESH_DELIVERED): ("settle", "fresh"),  # the same settle, deliveries alone
    id(queries.SETTLE_DUE): ("settle", "due"),
    id(queries.RECOVER_EXPIRED): ("recover", "expired"),
    id(queries.ACQUIRE_PERMITS): ("rate_limit", "permits"),
    id(queries.PAUSE_ALL): ("rate_limit", "pause"),
    id(queries.ANY_UNFINISHED): ("drain_check", "unfinished"),
}
TRACED = ("claim", "settle")


class Calls:
    """Times (and for claims and settles, traces) the Store's calls: `with calls.timed(statement) as call:
    return call.returned(run(...))`."""

    def __init__(self, metrics: Metrics | None = None, tracing: Tracing = OFF) -> None:
        self._metrics = metrics
        self._tracing = tracing

    def timed(self, statement: Any) -> _Call:
        kind, detail = KINDS.get(id(statement), ("other", "other"))
        span = self._tracing.call(kind, detail) if kind in TRACED else None
        return _Call(self._metrics, kind, span)


class _Call:
    __slots__ = ("_metrics", "_kind", "_span", "_started")

    def __init__(self, metrics: Metrics | None, kind: str, span: Any) -> None:
        self._metrics, self._kind, self._span = metrics, kind, span

    def __enter__(self) -> _Call:
        if self._span is not None:
            self._span.__enter__()
        self._started = time.perf_counter()
        return self

    def returned(self, ran: Any) -> Any:
        """Note what the statement returned (`ran`, a Ran: its rows or row count) on the span; returns it."""
        if self._span is not None:
            # a claim returns one row of nulls when it claimed nothing; a settle one row: how many it still held
            first = ran.rows[0] if ran.rows else None
            held = getattr(first, "held", None)
            self._span.rows(held if held is not None
                            else sum(getattr(row, "id", None) is not None for row in ran.rows))
        return ran

    def __exit__(self, *exc: Any) -> None:
        if self._metrics is not None:
            self._metrics.observe_database_call(self._kind, time.perf_counter() - self._started)
        if self._span is not None:
            self._span.__exit__(*exc)
