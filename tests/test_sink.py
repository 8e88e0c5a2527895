"""The /track receiver used by the tests, the demo and `fp-outbox sink`: real HTTP against 127.0.0.1."""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from worker.devtools import sink as sink_module
from worker.devtools import sink_cli
from worker.devtools.sink import Sink

REPO = Path(__file__).resolve().parent.parent
TOKEN = "tok-sink-test-secret"


def _event(i: int = 0, **props) -> dict:
    return {"event": "E", "properties": {"distinct_id": "u", "token": TOKEN, "time": 1.7e9,
                                         "$insert_id": f"id-{i}", **props}}


def _post(sink: Sink, i: int = 0, **props) -> requests.Response:
    return requests.post(sink.url, json=_event(i, **props), timeout=5)


def _base(sink: Sink) -> str:
    return sink.url.removesuffix("/track")


def _address(sink: Sink) -> tuple[str, int]:
    host, port = _base(sink).removeprefix("http://").split(":")
    return host, int(port)


@pytest.fixture
def receiver():
    with Sink(burst_limit=None) as sink:
        yield sink


def test_an_event_is_answered_200_and_recorded(receiver):
    before = time.time()
    answer = _post(receiver, 1, price=5)
    assert (answer.status_code, answer.json(), answer.headers["Content-Type"]) == (200, {"status": 1},
                                                                                  "application/json")
    [got] = receiver.received()
    assert (got.status, got.event, got.insert_id, got.token, got.retry_after) == (200, "E", "id-1", TOKEN, None)
    assert got.body == _event(1, price=5) and before <= got.arrived_at <= time.time()
    assert receiver.accepted() == [got]
    assert receiver.url.startswith("http://127.0.0.1:") and not receiver.url.endswith(":0/track")


def test_keep_alive_serves_many_requests_on_one_connection_quickly(receiver):
    started = time.monotonic()
    with requests.Session() as session:
        statuses = [session.post(receiver.url, json=_event(i), timeout=5).status_code for i in range(200)]
    assert statuses == [200] * 200
    assert time.monotonic() - started < 6.0  # ~40 ms each (8 s) if the body waited on a delayed ACK
    connection = http.client.HTTPConnection(*_address(receiver), timeout=5)
    connection.request("POST", "/track", body=b"{}", headers={"Content-Type": "application/json"})
    connection.getresponse().read()
    first = connection.sock
    for _ in range(5):
        connection.request("GET", "/_sink/stats")
        connection.getresponse().read()
    assert connection.sock is first  # the server never closed it
    connection.close()


@pytest.mark.parametrize("body, named", [
    (b"not json", "not JSON"),
    (b"", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"properties": {}}', "'event' is missing"),
    (b'{"event": 3, "properties": {}}', "'event' must be"),
    (b'{"event": "E"}', "'properties' is missing"),
    (b'{"event": "E", "properties": 3}', "'properties' must be"),
    (b'{"event": "E", "properties": {"token": "t", "time": 1}}', "properties.distinct_id is missing"),
    (b'{"event": "E", "properties": {"distinct_id": "u", "time": 1}}', "properties.token is missing"),
    (b'{"event": "E", "properties": {"distinct_id": "u", "token": "t"}}', "properties.time is missing"),
    (b'{"event": "E", "properties": {"distinct_id": "u", "token": "t", "time": "now"}}', "properties.time must"),
])
def test_a_body_that_is_not_an_event_gets_400_naming_the_problem(receiver, body, named):
    answer = requests.post(receiver.url, data=body, timeout=5)
    assert answer.status_code == 400 and named in answer.json()["error"]
    assert [r.status for r in receiver.received()] == [400]
    assert receiver.counts()["rejected"] == 1


def test_other_paths_and_methods_are_refused_and_not_recorded(receiver):
    assert requests.post(f"{_base(receiver)}/", json=_event(), timeout=5).status_code == 404
    answer = requests.get(receiver.url, timeout=5)
    assert answer.status_code == 405 and "POST" in answer.json()["error"]
    assert requests.get(f"{_base(receiver)}/nothing", timeout=5).status_code == 404
    assert receiver.received() == []


def test_scripted_answers_come_first_in_order_then_normal(receiver):
    receiver.answer_next(429, retry_after="7")
    receiver.answer_next(400, body="nope")
    receiver.answer_next(503, count=2)
    answers = [_post(receiver, i) for i in range(5)]
    assert [a.status_code for a in answers] == [429, 400, 503, 503, 200]
    assert answers[0].headers["Retry-After"] == "7" and answers[1].text == "nope"
    assert "Retry-After" not in answers[2].headers
    assert [r.retry_after for r in receiver.received()][:2] == ["7", None]


def test_a_scripted_reset_is_a_connection_error_and_the_next_request_succeeds(receiver):
    receiver.answer_next(0)
    with requests.Session() as session:
        with pytest.raises(requests.ConnectionError):
            session.post(receiver.url, json=_event(1), timeout=5)
        assert session.post(receiver.url, json=_event(2), timeout=5).status_code == 200
    assert [r.status for r in receiver.received()] == [0, 200]
    assert receiver.counts()["rejected"] == 1


def test_a_reset_is_an_rst_not_a_clean_close(receiver):
    receiver.answer_next(0)
    body = b'{"event": "E", "properties": {"distinct_id": "u", "token": "t", "time": 1}}'
    with socket.create_connection(_address(receiver), timeout=5) as conn:
        conn.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        with pytest.raises(ConnectionResetError):
            conn.recv(1024)


def test_latency_delays_the_answer_but_the_request_is_recorded_at_once(receiver):
    receiver.set_faults(latency=1.0)
    done = []
    sender = threading.Thread(target=lambda: done.append(_post(receiver).status_code))
    started = time.monotonic()
    sender.start()
    assert receiver.wait_for(lambda s: len(s.received()) == 1, 10)
    recorded = time.monotonic()
    assert not done or recorded - started >= 1.0  # recorded before the answer went, unless the machine stalled
    sender.join(10)
    assert done == [200] and time.monotonic() - started >= 1.0


def test_outage_answers_its_status_until_it_ends(receiver):
    started = time.monotonic()
    receiver.outage(1.0, status=502)
    statuses = [_post(receiver, i).status_code for i in range(2)]
    assert statuses == [502, 502] or time.monotonic() - started >= 1.0  # unless the machine stalled a second
    time.sleep(max(0.0, started + 1.05 - time.monotonic()))
    assert _post(receiver, 3).status_code == 200
    receiver.outage(60)
    assert _post(receiver, 4).status_code == 503
    receiver.outage(0)  # ends it early
    assert _post(receiver, 5).status_code == 200


def test_burst_limit_answers_429_with_retry_after_1_until_the_window_slides(monkeypatch):
    monkeypatch.setattr(sink_module, "BURST_WINDOW_S", 1.5)
    with Sink(burst_limit=5) as sink, requests.Session() as session:
        started = time.monotonic()
        answers = [session.post(sink.url, json=_event(i), timeout=5) for i in range(8)]
        if time.monotonic() - started < 1.5:  # all eight inside one window (else the machine stalled 1.5 s)
            assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
            assert answers[-1].headers["Retry-After"] == "1"
        time.sleep(max(0.0, started + 1.55 - time.monotonic()))
        assert session.post(sink.url, json=_event(9), timeout=5).status_code == 200
        sink.set_faults(burst_limit=None)
        assert all(session.post(sink.url, json=_event(i), timeout=5).ok for i in range(10))


def test_random_faults_change_while_running(receiver):
    receiver.set_faults(error_rate=1.0, error_status=503, retry_after="2")
    answer = _post(receiver)
    assert (answer.status_code, answer.headers.get("Retry-After")) == (503, "2")
    receiver.set_faults(error_status=429, retry_after=None)
    answer = _post(receiver)
    assert (answer.status_code, answer.headers.get("Retry-After")) == (429, None)
    receiver.set_faults(error_rate=0.0, reset_rate=1.0)
    with pytest.raises(requests.ConnectionError):
        _post(receiver)
    receiver.set_faults(reset_rate=0.0)
    assert _post(receiver).status_code == 200
    assert [r.status for r in receiver.received()] == [503, 429, 0, 200]


def test_error_rate_is_reproducible_with_a_seed():
    def statuses(seed: int) -> list[int]:
        with Sink(burst_limit=None, error_rate=0.5, seed=seed) as sink, requests.Session() as session:
            return [session.post(sink.url, json=_event(i), timeout=5).status_code for i in range(20)]
    first = statuses(7)
    assert first == statuses(7) and {200, 503} == set(first)


def test_rejected_event_names_get_their_status_before_any_other_fault(receiver):
    receiver.set_faults(reject_events={"Bad": 400}, reset_rate=1.0)
    answer = requests.post(receiver.url, json={**_event(), "event": "Bad"}, timeout=5)
    assert answer.status_code == 400 and "rejected by the sink" in answer.json()["error"]
    receiver.set_faults(reject_events=None, reset_rate=0.0)
    assert requests.post(receiver.url, json={**_event(), "event": "Bad"}, timeout=5).status_code == 200


def test_steering_refuses_settings_that_make_no_sense(receiver):
    with pytest.raises(ValueError, match="error_rate"):
        receiver.set_faults(error_rate=1.5)
    with pytest.raises(ValueError, match="status"):
        receiver.answer_next(42)
    with pytest.raises(TypeError):
        receiver.set_faults(latencyy=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="latency"):
        Sink(latency=-1)
    assert _post(receiver).status_code == 200  # nothing half-applied


def test_counts_duplicates_by_insert_id_among_accepted_only(receiver):
    for _ in range(3):
        _post(receiver, 1)
    _post(receiver, 2)
    receiver.answer_next(503)
    _post(receiver, 3)  # rejected: not a delivery, so not distinct either
    assert receiver.counts() == {"requests": 5, "accepted": 4, "distinct_insert_ids": 2, "duplicates": 2,
                                 "rejected": 1}
    assert len(receiver.accepted()) == 4


def test_clear_forgets_what_arrived_but_not_the_faults(receiver):
    _post(receiver, 1)
    receiver.answer_next(503)
    receiver.clear()
    assert receiver.received() == [] and receiver.counts()["requests"] == 0
    assert _post(receiver, 2).status_code == 503


def test_wait_for_is_bounded_and_sees_arrivals(receiver):
    started = time.monotonic()
    assert receiver.wait_for(lambda s: False, 0.1) is False
    assert 0.1 <= time.monotonic() - started < 5.0  # bounded: it gave up, long before any test timeout
    threading.Timer(0.05, lambda: _post(receiver)).start()
    assert receiver.wait_for(lambda s: s.counts()["accepted"] == 1, 5)


def test_stats_and_events_pages_never_show_the_token(receiver):
    for i in range(3):
        _post(receiver, i)
    assert requests.get(f"{_base(receiver)}/_sink/stats", timeout=5).json() == receiver.counts()
    shown = requests.get(f"{_base(receiver)}/_sink/events?limit=2", timeout=5).json()
    assert [e["insert_id"] for e in shown] == ["id-1", "id-2"] and {e["token"] for e in shown} == {"***"}
    assert set(shown[0]) == {"arrived_at", "status", "event", "insert_id", "token"}
    assert TOKEN not in requests.get(f"{_base(receiver)}/_sink/events", timeout=5).text
    assert requests.get(f"{_base(receiver)}/_sink/events?limit=0", timeout=5).json() == []
    assert requests.get(f"{_base(receiver)}/_sink/events?limit=-1", timeout=5).status_code == 400


def test_stop_is_idempotent_and_cuts_keep_alive_connections():
    sink = Sink(burst_limit=None).start()
    with requests.Session() as session:
        assert session.post(sink.url, json=_event(), timeout=5).status_code == 200
        sink.stop()
        sink.stop()
        with pytest.raises(requests.ConnectionError):
            session.post(sink.url, json=_event(), timeout=5)
    with pytest.raises(RuntimeError):
        sink.start()


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sink_cli.add_arguments(parser)
    return parser.parse_args(list(flags))


@pytest.mark.parametrize("flags, named", [
    (["--error-rate", "1.5"], "--error-rate"),
    (["--reset-rate", "-0.1"], "--reset-rate"),
    (["--error-status", "200"], "--error-status"),
    (["--latency-ms", "-5"], "--latency-ms"),
    (["--burst-limit", "-1"], "--burst-limit"),
    (["--port", "70000"], "--port"),
])
def test_cli_refuses_bad_flags_with_exit_2_naming_the_flag(capsys, flags, named):
    with pytest.raises(SystemExit) as exited:
        sink_cli.run(_args(*flags))
    assert exited.value.code == 2 and named in capsys.readouterr().err


def test_cli_refuses_a_port_in_use(capsys):
    with Sink() as taken:
        port = _address(taken)[1]
        with pytest.raises(SystemExit) as exited:
            sink_cli.run(_args("--port", str(port)))
    assert exited.value.code == 2 and "--port" in capsys.readouterr().err


def test_cli_prints_each_event_without_the_token_and_final_counts_on_sigint(tmp_path):
    output = tmp_path / "out.txt"
    code = ("import argparse, sys; from worker.devtools import sink_cli as sink; p = argparse.ArgumentParser(); "
            "sink.add_arguments(p); sys.exit(sink.run(p.parse_args(sys.argv[1:])))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with output.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--print"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 10
        while "Ctrl-C" not in output.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        url = output.read_text().split("POST events to ")[1].split()[0]
        assert requests.post(url, json=_event(42), timeout=5).status_code == 200
        while "id-42" not in output.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
    text = output.read_text()
    assert "id-42" in text and "final: requests=1  accepted=1" in text and TOKEN not in text
