"""Sending on real sockets: what is read of an answer, each request's total deadline, the lease rule for
in-process re-sends, and a stop that never lets a released row see another request."""

from __future__ import annotations

import json
import math
import signal
import socket
import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from tests.conftest import status_of, wait_until
from tests.rawhttp import RawServer, TLSServer, read_request
from worker.devtools.fast_receiver import ReceiverProcess
from worker.engine import Dead, Delivered, Retry, build_parser, from_args
from worker.engine.permits import Permits
from worker.engine.inflight import Gate
from worker.engine.metrics import Metrics
from worker.engine.sender import Sender
from worker.engine.settings import LEASE_MARGIN
from worker.engine.store import Claimed, Store
from worker.engine.timeouts import CALL_DEADLINE
from worker.engine.transport import READ_LIMIT

BODY = '{"event": "E", "properties": {"distinct_id": "u", "token": "tok-sender-test", "time": 1.7e9}}'
ROW = Claimed(id=1, attempts=1, payload=BODY, insert_id="sender-test-1")


def _settings(endpoint: str, *flags: str):
    argv = ["--database-url", "postgresql://nobody@127.0.0.1:1/none", "--endpoint", endpoint, *flags]
    return from_args(build_parser().parse_args(argv), environ={})


def _at_once(count: int, max_wait: float) -> float:
    """Permits as a worker alone on an idle schedule gets them: its slice starts now."""
    return time.monotonic() + 1.0


def _sender(endpoint: str, *flags: str, permits=_at_once) -> Sender:
    return Sender(_settings(endpoint, *flags), permits)


OPEN = Gate()  # never closed: the worker holds every row


def _closed() -> Gate:
    gate = Gate()
    gate.close(0)
    return gate


def test_only_the_head_of_a_huge_error_page_is_read():
    """A 100 MB error page: the excerpt comes from its first KiB, and the rest is never waited for."""
    def serve(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 100000000\r\n\r\n" + b"oops " * 13000)
        time.sleep(30)  # the remaining 99.9 MB never come: reading them whole would end in a timeout

    server = RawServer(serve)
    try:
        started = time.monotonic()
        outcome = _sender(server.url, "--read-timeout", "3", "--inline-attempts", "1").send(
            ROW, time.monotonic() + 60, OPEN, math.inf)
        assert isinstance(outcome, Dead) and outcome.status == 400 and outcome.reason.startswith("HTTP 400: oops")
        assert time.monotonic() - started < 3  # answered from the head, no read timeout waited out
    finally:
        server.close()


def test_a_trickling_answer_is_cut_at_the_requests_total_deadline():
    with ReceiverProcess(mode="trickle") as trickling:
        sender = _sender(trickling.url, "--connect-timeout", "0.5", "--read-timeout", "2", "--inline-attempts", "1")
        started = time.monotonic()
        outcome = sender.send(ROW, time.monotonic() + 60, OPEN, math.inf)
        elapsed = time.monotonic() - started
    assert isinstance(outcome, Retry) and outcome.reason.startswith("deadline"), outcome
    assert 2.5 <= elapsed < 2.5 + 2  # the deadline (connect + read timeout), plus the reaper's tick and slack


def test_a_re_send_starts_only_if_the_lease_holds_its_whole_deadline():
    def serve(connection: socket.socket) -> None:
        with connection:
            while read_request(connection):
                connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")

    server = RawServer(serve)
    try:
        flags = ("--connect-timeout", "0.5", "--read-timeout", "1", "--inline-attempts", "3")
        outcome = _sender(server.url, *flags).send(ROW, time.monotonic() + 1.5 + LEASE_MARGIN + 0.5, OPEN, math.inf)
        assert outcome == Retry("HTTP 503: busy", 503)  # one try: after it the lease had no room for another
        asked = []
        permits = lambda count, max_wait: asked.append(max_wait) or None  # noqa: E731: the budget is far off
        outcome = _sender(server.url, *flags, permits=permits).send(ROW, time.monotonic() + 30, OPEN, math.inf)
        assert outcome == Retry("HTTP 503: busy", 503) and len(asked) == 1 and 0 < asked[0] < 30
    finally:
        server.close()


def test_nothing_is_sent_once_the_worker_let_the_row_go():
    with ReceiverProcess() as receiver:
        assert _sender(receiver.url).send(ROW, time.monotonic() + 60, _closed(), math.inf) is None
        assert _sender(receiver.url).send(ROW, time.monotonic() + 60, OPEN, math.inf) == Delivered(200)
        assert receiver.stats()["requests"] == 1


def test_permits_for_a_re_send_are_never_waited_for_past_the_lease(clean):
    store = Store(clean, "me", 30.0)
    settings = _settings("http://127.0.0.1:1/track")
    permits = Permits(store, settings, Metrics())
    with clean.begin() as conn:
        conn.execute(text("SELECT setval('fp_outbox_rate_limit_seq', 0)"))  # the shared schedule back at its start
    store.pause_all(600)  # a 429 with Retry-After: 600 paused every worker
    started = time.monotonic()
    assert permits.take(1, max_wait=5.0) is None
    assert time.monotonic() - started < 2
    store.pause_all(0)
    with clean.begin() as conn:
        conn.execute(text("SELECT setval('fp_outbox_rate_limit_seq', 0)"))  # the shared schedule back at its start
    assert permits.take(1, max_wait=5.0) is not None


def test_sigterm_with_a_hanging_endpoint_releases_and_never_sends_a_released_row_again(clean, db_url, workers):
    with Session(clean) as session:
        outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": f"u{i}"}} for i in range(8)])
        session.commit()
    with ReceiverProcess(mode="hang") as hanging:
        worker = workers(db_url, hanging.url, "--concurrency", "4", "--connect-timeout", "0.5", "--read-timeout", "3",
                         "--inline-attempts", "3", "--poll-interval", "0.2")
        assert wait_until(lambda: hanging.stats()["requests"] >= 4, 20), worker.output()
        stopped = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert wait_until(lambda: status_of(clean).get("in_flight", 0) == 0, 20), worker.output()
        released = hanging.stats()["requests"]  # read once every row is back to pending
        assert worker.wait(30) == 0, worker.output()
        # One request's worth of grace (3.5 s + 1 s), then at most the final settle and the release, each within
        # the worker's call deadline: no sending thread keeps the process alive (before, they went on sending
        # the released rows and the process outlived them). Typically 4.6 s here.
        took = time.monotonic() - stopped
        assert took < 4.5 + 2 * CALL_DEADLINE, f"the worker took {took:.1f} s to stop"
        time.sleep(1.0)
        assert hanging.stats()["requests"] == released  # nothing was sent for a released row
    assert status_of(clean) == {"pending": 8}


def test_once_closed_no_send_starts_and_the_rows_not_started_stay_to_be_released():
    from worker.engine.inflight import InFlight

    release_first, started = threading.Event(), []

    def send(row, lease_ends, gate, slice_ends):
        if not gate.is_open():
            return None
        started.append(row.id)
        release_first.wait(10)
        return Delivered(200)

    in_flight = InFlight(send, 1, Metrics())
    rows = [Claimed(id=n, attempts=1, payload=BODY, insert_id=f"i{n}") for n in (1, 2, 3)]
    for row in rows:
        in_flight.start(row, time.monotonic() + 60, math.inf)
    assert wait_until(lambda: started == [1], 5)
    in_flight.close(0)
    release_first.set()
    assert wait_until(lambda: in_flight.finished(0.05) != [] or len(in_flight) < 3, 5)
    time.sleep(0.2)
    assert started == [1] and sorted(row.id for row in in_flight.rows()) == [2, 3]


def _row(event: str, n: int = 1) -> Claimed:
    body = json.dumps({"event": event, "properties": {"distinct_id": "u", "token": "tok-sender-test", "time": 1.7e9}})
    return Claimed(id=n, attempts=1, payload=body, insert_id=f"sender-test-{event}")


@pytest.mark.parametrize("interim", [b"103 Early Hints\r\nLink: </a.css>; rel=preload", b"102 Processing"],
                         ids=["103", "102"])
def test_interim_answers_are_skipped_and_the_connection_stays_in_step(interim):
    """Event A is answered with an interim answer, then (a moment later) its real answer, a 400; then event B,
    on the same keep-alive connection, with a 200. Each event gets its own answer."""
    def serve(connection: socket.socket) -> None:
        with connection:
            while request := read_request(connection):
                if json.loads(request.partition(b"\r\n\r\n")[2])["event"] == "A":
                    connection.sendall(b"HTTP/1.1 " + interim + b"\r\n\r\n")
                    time.sleep(0.3)  # the interim answer is read alone, as when the server is still thinking
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad event A")
                else:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with RawServer(serve) as server:
        sender = _sender(server.url, "--inline-attempts", "1")
        first = sender.send(_row("A", 1), time.monotonic() + 60, OPEN, math.inf)
        second = sender.send(_row("B", 2), time.monotonic() + 60, OPEN, math.inf)
    assert first == Dead("HTTP 400: bad event A", 400)
    assert second == Delivered(200)


def test_an_answer_longer_than_the_read_limit_is_never_waited_for_and_its_connection_goes():
    """A 400 longer than the read limit whose tail comes late (after the read timeout): the excerpt comes from
    its head at once, the connection (in the middle of that answer) is closed, and the next send on the same
    thread is delivered at its first attempt, on a new connection."""
    def serve(connection: socket.socket) -> None:
        with connection:
            while request := read_request(connection):
                if json.loads(request.partition(b"\r\n\r\n")[2])["event"] == "A":
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % (READ_LIMIT + 1000)
                                       + b"e" * READ_LIMIT)
                    time.sleep(3)
                    connection.sendall(b"e" * 1000)
                else:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with RawServer(serve) as server:
        sender = _sender(server.url, "--read-timeout", "2", "--inline-attempts", "1")
        started = time.monotonic()
        first = sender.send(_row("A", 1), time.monotonic() + 60, OPEN, math.inf)
        took = time.monotonic() - started
        second = sender.send(_row("B", 2), time.monotonic() + 60, OPEN, math.inf)
        assert server.requests == 2  # connections: the second send did not reuse the first's
    assert isinstance(first, Dead) and first.status == 400 and first.reason.startswith("HTTP 400: eee"), first
    assert took < 1.0, f"waited {took:.1f} s for a tail that was never needed"
    assert second == Delivered(200)


# A whole request is 3.2 s, so a stop's grace (a request's deadline and the reaper's tick) is under 3.5 s: the
# first attempt (2.3 s of handshake, then a 503) ends inside it, the re-send starts inside it and is still in
# its handshake when it ends.
SLOW_HANDSHAKE = 2.3
ONE_AT_A_TIME = ["--concurrency", "1", "--connect-timeout", "3", "--read-timeout", "0.2", "--inline-attempts", "3",
                 "--poll-interval", "0.2"]


def _one_event_and_an_endpoint_slow_to_shake_hands(clean, folder) -> TLSServer:
    """One event enqueued, and an HTTPS endpoint whose every handshake comes SLOW_HANDSHAKE late and whose every
    answer is a 503 that closes the connection (so a re-send needs a handshake of its own)."""
    with Session(clean) as session:
        outbox.enqueue(session, {"event": "E", "properties": {"distinct_id": "u"}})
        session.commit()
    busy = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbusy"
    return TLSServer(folder, lambda: SLOW_HANDSHAKE, busy)


def _nothing_arrives_after(endpoint: TLSServer, released_at: float) -> None:
    assert len(endpoint.connected) == 2 and len(endpoint.arrived) == 1  # the re-send was under way at the release
    time.sleep(max(0.0, endpoint.connected[1] + SLOW_HANDSHAKE + 1.0 - time.monotonic()))  # its handshake is over
    assert [at for at in endpoint.arrived if at > released_at] == []


def test_no_byte_of_a_request_is_written_once_its_row_is_released(clean, db_url, tmp_path, monkeypatch):
    """A stop whose grace ends while a re-send is still in its TLS handshake (the row is let go before the
    handshake ends): the request must never be written, and the row is released. The worker runs in this
    process (stopped as its signal handler does), so its sending thread outlives the release here: in a worker
    process of its own, the exit that follows the release hides a request written after it (but for a race)."""
    from tests.inprocess import settings, start
    from worker.engine import Worker

    endpoint = _one_event_and_an_endpoint_slow_to_shake_hands(clean, tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", endpoint.cert)
    worker = Worker(settings(db_url, endpoint.url, *ONE_AT_A_TIME))
    runner = start(worker)
    try:
        assert wait_until(lambda: endpoint.connected, 20)
        worker.stop()
        runner.join(30)
        assert not runner.is_alive()
        _nothing_arrives_after(endpoint, released_at=time.monotonic())
        assert status_of(clean) == {"pending": 1}
    finally:
        worker.engine.dispose()
        endpoint.close()


def test_sigterm_to_a_worker_in_a_slow_handshake_sends_nothing_for_the_released_row(clean, db_url, tmp_path,
                                                                                     workers):
    """The same stop, by SIGTERM to a worker process: it exits 0, the row is released, and no request for it
    arrives after the release (as the database shows it)."""
    endpoint = _one_event_and_an_endpoint_slow_to_shake_hands(clean, tmp_path)
    try:
        worker = workers(db_url, endpoint.url, *ONE_AT_A_TIME, env={"REQUESTS_CA_BUNDLE": endpoint.cert})
        assert wait_until(lambda: endpoint.connected, 20), worker.output()
        worker.signal(signal.SIGTERM)
        assert wait_until(lambda: status_of(clean) == {"pending": 1}, 20, interval=0.01), worker.output()
        released_at = time.monotonic()
        assert worker.wait(30) == 0, worker.output()
        _nothing_arrives_after(endpoint, released_at)
    finally:
        endpoint.close()
