"""OpenTelemetry for the worker (the `otel` extra): a span per delivery attempt, linked to the trace the event
was enqueued in, and a span for each claim and settle statement. Configured by the standard OTEL_* environment
variables (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_*, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, ...), or by the
tracer provider an embedding process already set. Off, every method is a no-op and nothing of OpenTelemetry
is imported."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from outbox import __version__
from outbox.db import ConfigError
from worker.engine.policy import Dead, Delivered, Outcome, Retry

SERVICE_NAME = "fp-outbox-worker"
TRACER_NAME = "fp-outbox.worker"


class Tracing:
    """Makes the worker's spans with `tracer`, or nothing at all when it is None (OFF)."""

    def __init__(self, tracer: Any = None) -> None:
        self._tracer = tracer

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def attempt(self, row: Any) -> Any:
        """A span for one delivery attempt of `row` (a Claimed), linked to the trace it was enqueued in; use as
        `with tracing.attempt(row) as span: ... span.finish(outcome)`."""
        if self._tracer is None:
            return _NO_SPAN
        span = self._tracer.start_span("fp-outbox deliver", kind=_kind("CLIENT"), links=_links(row.trace_context),
                                       attributes={"fp_outbox.event.id": row.id, "fp_outbox.attempt": row.attempts,
                                                   "fp_outbox.insert_id": row.insert_id})
        return _AttemptSpan(span)

    def call(self, name: str, detail: str) -> Any:
        """A span for one database statement of the cycle (claim, settle), or _NO_SPAN."""
        if self._tracer is None:
            return _NO_SPAN
        span = self._tracer.start_span(f"fp-outbox {name}", kind=_kind("CLIENT"),
                                       attributes={"db.system": "postgresql", f"fp_outbox.{name}": detail})
        return _CallSpan(span)


OFF = Tracing()


class _NoSpan:
    """What every span is while tracing is off: a context manager that records nothing."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def finish(self, outcome: Outcome | None) -> None:
        return None

    def rows(self, count: int) -> None:
        return None


_NO_SPAN = _NoSpan()


class _Span(_NoSpan):
    def __init__(self, span: Any) -> None:
        self._span = span

    def __exit__(self, kind, exc, traceback) -> None:
        if exc is not None:
            self._span.record_exception(exc)
            self._span.set_status(_status("ERROR", f"{kind.__name__}: {exc}"))
        self._span.end()


class _AttemptSpan(_Span):
    def finish(self, outcome: Outcome | None) -> None:
        """Record what the attempt came to: its HTTP status and outcome (delivered, retry, dead, released)."""
        kind = {Delivered: "delivered", Retry: "retry", Dead: "dead"}.get(type(outcome), "released")
        self._span.set_attribute("fp_outbox.outcome", kind)
        status = getattr(outcome, "status", None)
        if status is not None:
            self._span.set_attribute("http.response.status_code", status)
        if isinstance(outcome, Retry | Dead):
            self._span.set_status(_status("ERROR", outcome.reason[:200]))


class _CallSpan(_Span):
    def rows(self, count: int) -> None:
        self._span.set_attribute("fp_outbox.rows", count)


def from_environment(environ: Mapping[str, str] | None = None) -> Tracing:
    """The worker's tracing: the SDK tracer provider the process already has (an application embedding the
    worker, or `opentelemetry-instrument`), else one built from the OTEL_* variables when they name an
    exporter, else OFF. Raises ConfigError when they name one that is not installed."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return OFF
    if "opentelemetry.trace" in sys.modules:
        from opentelemetry import trace

        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return Tracing(trace.get_tracer(TRACER_NAME, __version__))
    names = exporter_names(env)
    if not names:
        return OFF
    provider = _provider(names, env)
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    return Tracing(provider.get_tracer(TRACER_NAME, __version__))


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for, as entry point names: OTEL_TRACES_EXPORTER (`otlp` over
    http/protobuf unless OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL says grpc), else `otlp` when an OTLP endpoint is
    set; none otherwise (a worker with the extra and no collector exports nothing)."""
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        raw = "otlp"
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "")
    otlp = "otlp_proto_grpc" if protocol.strip() == "grpc" else "otlp_proto_http"
    names = [name.strip() for name in raw.split(",") if name.strip() and name.strip() != "none"]
    return [otlp if name == "otlp" else name for name in names]


def _provider(names: list[str], env: Mapping[str, str]) -> Any:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError("OTEL_TRACES_EXPORTER (or an OTLP endpoint) is set, but OpenTelemetry's SDK is not "
                          "installed: pip install 'fp-outbox[otel]', or unset the OTEL_* variables") from None
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": SERVICE_NAME}))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)()))
    return provider


def _exporter(name: str) -> Any:
    from importlib.metadata import entry_points

    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise ConfigError(f"OTEL_TRACES_EXPORTER names the span exporter {name!r}, which no installed package "
                          "provides; fp-outbox[otel] brings otlp (http/protobuf) and console")
    return next(iter(found)).load()


def _links(trace_context: str | None) -> list[Any]:
    """A link to the span that enqueued the event, from its stored W3C context; none if absent or unreadable
    (a bad value never stops a delivery)."""
    if not trace_context:
        return []
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    try:
        carrier = json.loads(trace_context)
        context = TraceContextTextMapPropagator().extract(carrier if isinstance(carrier, dict) else {})
    except ValueError:
        return []
    linked = trace.get_current_span(context).get_span_context()
    return [trace.Link(linked)] if linked.is_valid else []


def _kind(name: str) -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind[name]


def _status(code: str, description: str) -> Any:
    from opentelemetry.trace import Status, StatusCode

    return Status(StatusCode[code], description)
