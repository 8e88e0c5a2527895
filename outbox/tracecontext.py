"""The trace context `enqueue` stores with an event, when the application traces with OpenTelemetry: the
active span's W3C traceparent and tracestate, as JSON, for the worker to link its delivery spans to (the
`otel` extra). It is stored in its own column, never in the payload sent to Freshpaint.

Nothing of OpenTelemetry is imported unless the application already imported it (looked up in sys.modules):
an application that does not trace pays one dictionary lookup per enqueue and writes the statement it always
wrote."""

from __future__ import annotations

import json
import sys


def current() -> str | None:
    """The active, sampled span's context as JSON (`{"traceparent": ..., "tracestate": ...}`), or None."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = trace.get_current_span().get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):  # an unsampled trace is never exported: no link
        return None
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return json.dumps(carrier, separators=(",", ":")) if "traceparent" in carrier else None
