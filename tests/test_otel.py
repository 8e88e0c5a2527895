"""OpenTelemetry (the `otel` extra): every way to enqueue stores the active span's W3C context with the row and
never in the payload; an application that does not trace writes the statement it always wrote and imports
nothing of OpenTelemetry; the worker's delivery spans, on real deliveries to a real receiver, link to the
enqueuing span with the HTTP status, outcome and attempt, beside its claim and settle spans; and a worker
process is configured by the OTEL_* variables."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from sqlalchemy import text

from tests import inprocess
from tests.conftest import REPO, TOKEN, url_string, wait_until
from tests.test_flavours import db, flavour, flavours, purchase  # noqa: F401 (fixtures)
from worker.engine import Worker
from worker.engine.tracing import TRACER_NAME, Tracing, exporter_names, from_environment

# A provider of this module's own: the process-wide one stays unset, so no other test traces.
EXPORTED = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTED))
TRACER = PROVIDER.get_tracer("the application")


@pytest.fixture(autouse=True)
def fresh_spans():
    EXPORTED.clear()
    yield


def stored(engine) -> list[tuple[str, str | None, str]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(
            "SELECT insert_id, trace_context, payload::text FROM fp_outbox_events ORDER BY id"))]


def ids_of(span) -> str:
    """The version, trace id and span id of the span's W3C traceparent (its flags follow)."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-"


def test_every_flavour_stores_the_active_context_apart_from_the_payload(flavour, db):
    with flavour.open() as handle, TRACER.start_as_current_span("POST /orders") as request:
        flavour.order(handle, "r1")
        one = flavour.enqueue(handle, purchase())
        many = flavour.enqueue_many(handle, [purchase("a"), purchase("b")])
        identified = flavour.identify(handle, "13793", {"plan": "pro"})
        flavour.commit(handle)
    rows = stored(db)
    assert [row[0] for row in rows] == [one, *many, identified]
    for _, trace_context, payload in rows:
        carrier = json.loads(trace_context)
        assert list(carrier) == ["traceparent"] and carrier["traceparent"].startswith(ids_of(request))
        assert "traceparent" not in payload and f"{request.get_span_context().trace_id:032x}" not in payload


def test_no_active_span_writes_todays_statement(flavour, db):
    with flavour.open() as handle, flavour.recording(handle) as seen:
        flavour.enqueue(handle, purchase())
        flavour.enqueue_many(handle, [purchase("a")])
        flavour.commit(handle)
    assert seen and not any("trace_context" in str(statement) for statement in seen), seen
    assert all(trace_context is None for _, trace_context, _ in stored(db))


def test_an_unsampled_span_stores_nothing(clean):
    from sqlalchemy.orm import Session

    import outbox

    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("quiet")
    with Session(clean) as session, unsampled.start_as_current_span("request"):
        outbox.enqueue(session, purchase())
        session.commit()
    assert stored(clean)[0][1] is None  # nothing is exported for it, so there is nothing to link to


@pytest.mark.parametrize("traces_first", [False, True], ids=["no tracing", "tracing"])
def test_import_outbox_loads_opentelemetry_only_if_the_application_did(db_url, clean, traces_first):
    code = f"""
import sys
if {traces_first}:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
import outbox
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
with Session(create_engine({url_string(db_url)!r})) as session:
    if {traces_first}:
        with trace.get_tracer("app").start_as_current_span("request"):
            outbox.enqueue(session, {{"event": "E", "properties": {{"distinct_id": "1"}}}})
    else:
        outbox.enqueue(session, {{"event": "E", "properties": {{"distinct_id": "1"}}}})
    session.commit()
print(len(loaded), sum(m.startswith("opentelemetry") for m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    if traces_first:
        assert before > 0 and stored(clean)[0][1].startswith('{"traceparent":"00-')
    else:
        assert (before, after) == (0, 0)
        assert stored(clean)[0][1] is None


def test_delivery_spans_link_to_the_enqueuing_span_on_real_deliveries(clean, db_url, sink):
    from sqlalchemy.orm import Session

    import outbox

    sink.set_faults(reject_events={"Refused": 400})
    sink.answer_next(503)  # the first request: retried in process, then delivered
    with Session(clean) as session, TRACER.start_as_current_span("POST /orders") as request:
        ids = [outbox.enqueue(session, {"event": name, "properties": {"distinct_id": "1"}})
               for name in ("Purchase", "Refused")]
        session.commit()
    worker = Worker(inprocess.settings(db_url, sink.url, "--drain", "--inline-attempts", "2"),
                    tracing=Tracing(PROVIDER.get_tracer(TRACER_NAME)))
    inprocess.drain(worker)
    assert {r.insert_id for r in sink.accepted()} == {ids[0]}
    assert all("traceparent" not in json.dumps(r.body) for r in sink.received())
    spans = EXPORTED.get_finished_spans()
    deliveries = {span.attributes["fp_outbox.insert_id"]: span for span in spans if span.name == "fp-outbox deliver"}
    assert set(deliveries) == set(ids)
    for span in deliveries.values():
        assert [link.context.span_id for link in span.links] == [request.get_span_context().span_id]
        assert span.links[0].context.trace_id == request.get_span_context().trace_id
        assert span.attributes["fp_outbox.attempt"] == 1
        assert span.kind == trace.SpanKind.CLIENT
    assert deliveries[ids[0]].attributes["fp_outbox.outcome"] == "delivered"
    assert deliveries[ids[0]].attributes["http.response.status_code"] == 200
    assert deliveries[ids[1]].attributes["fp_outbox.outcome"] == "dead"
    assert deliveries[ids[1]].attributes["http.response.status_code"] == 400
    assert deliveries[ids[1]].status.status_code == trace.StatusCode.ERROR
    claims = [span for span in spans if span.name == "fp-outbox claim"]
    settles = [span for span in spans if span.name == "fp-outbox settle"]
    assert sum(span.attributes["fp_outbox.rows"] for span in claims) == 2
    # both came with a fresh claim: their outcomes (one delivered, one dead) are settled by the fresh claims' settle
    assert {span.attributes["fp_outbox.settle"] for span in settles} == {"fresh"}
    assert sum(span.attributes["fp_outbox.rows"] for span in settles) == 2
    assert worker.metrics.registry.get_sample_value("fp_outbox_delivered_total") == 1


def test_a_retry_is_an_attempt_of_its_own(clean, db_url, sink):
    from sqlalchemy.orm import Session

    import outbox

    sink.answer_next(503)  # one try per claim: the 503 goes back to the row, the next claim delivers
    with Session(clean) as session, TRACER.start_as_current_span("request"):
        insert_id = outbox.enqueue(session, purchase())
        session.commit()
    worker = Worker(inprocess.settings(db_url, sink.url, "--drain", "--inline-attempts", "1"),
                    tracing=Tracing(PROVIDER.get_tracer(TRACER_NAME)))
    inprocess.drain(worker)
    attempts = sorted((span.attributes["fp_outbox.attempt"], span.attributes["fp_outbox.outcome"],
                       span.attributes["http.response.status_code"])
                      for span in EXPORTED.get_finished_spans() if span.name == "fp-outbox deliver")
    assert attempts == [(1, "retry", 503), (2, "delivered", 200)]
    assert {r.insert_id for r in sink.accepted()} == {insert_id}


def test_the_environment_names_the_exporters():
    assert exporter_names({}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp_proto_http"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == \
        ["otlp_proto_grpc", "console"]
    assert not from_environment({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}).enabled


def test_a_worker_process_exports_as_the_otel_variables_say(clean, db_url, sink, workers):
    from sqlalchemy.orm import Session

    import outbox

    with Session(clean) as session, TRACER.start_as_current_span("request") as request:
        outbox.enqueue(session, purchase())
        session.commit()
    proc = workers(db_url, sink.url, "--poll-interval", "0.2",
                   env={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "outbox-test", "OTEL_BSP_SCHEDULE_DELAY": "100"})
    assert wait_until(lambda: '"name": "fp-outbox deliver"' in proc.output(), 30), proc.output()
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.output()
    output = proc.output()
    assert '"service.name": "outbox-test"' in output
    assert f"0x{request.get_span_context().trace_id:032x}" in output  # the link
    assert TOKEN not in output


def test_an_exporter_that_is_not_installed_is_a_configuration_error(db_url, sink, workers):
    proc = workers(db_url, sink.url, env={"OTEL_TRACES_EXPORTER": "zipkin_json"})
    assert proc.wait(30) == 2
    assert "OTEL_TRACES_EXPORTER names the span exporter 'zipkin_json'" in proc.output()
    assert "Traceback" not in proc.output()


def test_an_embedding_processs_own_provider_is_used():
    code = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from worker.engine.tracing import from_environment
assert not from_environment({}).enabled
trace.set_tracer_provider(TracerProvider())
print(from_environment({}).enabled)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
