"""The benchmarks' fast receiver, in its own process: answers 200 over keep-alive, counts requests and distinct
$insert_ids, resets, and can hang or trickle its answers (for the deadline and shutdown tests)."""

from __future__ import annotations

import json
import socket
import time

import pytest
import urllib3

from worker.devtools.fast_receiver import ReceiverProcess


@pytest.fixture(scope="module")
def receiver():
    with ReceiverProcess() as process:
        yield process


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").removesuffix("/track").split(":")
    return host, int(port)


def _body(insert_id: str) -> bytes:
    return json.dumps({"event": "E", "properties": {"distinct_id": "u", "$insert_id": insert_id}}).encode()


def test_counts_requests_and_distinct_insert_ids_over_keep_alive(receiver):
    receiver.reset()
    pool = urllib3.HTTPConnectionPool(*_address(receiver.url), maxsize=1)
    answers = [pool.request("POST", "/track", body=_body(f"id-{i % 7}")) for i in range(50)]
    assert {a.status for a in answers} == {200} and answers[0].json() == {"status": 1}
    assert pool.num_connections == 1  # every request on one kept-alive connection
    assert receiver.stats()["requests"] == 50 and receiver.stats()["distinct_insert_ids"] == 7
    times = receiver.arrivals()
    assert len(times) == 50 and times == sorted(times) and time.time() - 60 < times[0] <= time.time()
    receiver.reset()
    assert receiver.stats()["requests"] == 0 and receiver.stats()["distinct_insert_ids"] == 0
    assert receiver.stats()["pid"] == receiver.proc.pid and receiver.cpu_seconds() >= 0


def test_pipelined_and_split_requests_are_each_answered(receiver):
    receiver.reset()
    one = b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
    stream = b"".join(one % (len(_body(f"p{i}")), _body(f"p{i}")) for i in range(3))
    with socket.create_connection(_address(receiver.url), timeout=5) as conn:
        for start in range(0, len(stream), 17):  # cut anywhere, even inside the head
            conn.sendall(stream[start:start + 17])
            time.sleep(0.001)
        answers = b""
        while answers.count(b"HTTP/1.1 200 OK") < 3:
            answers += conn.recv(4096)
    assert receiver.stats() == {"requests": 3, "distinct_insert_ids": 3, "pid": receiver.proc.pid}


def test_hang_mode_reads_and_counts_but_never_answers():
    with ReceiverProcess(mode="hang") as hanging:
        pool = urllib3.HTTPConnectionPool(*_address(hanging.url), maxsize=1, retries=False)
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            pool.request("POST", "/track", body=_body("h"), timeout=urllib3.Timeout(connect=5, read=0.3))
        assert hanging.stats()["requests"] == 1


def test_trickle_mode_answers_one_byte_a_second():
    with ReceiverProcess(mode="trickle") as trickling:
        with socket.create_connection(_address(trickling.url), timeout=5) as conn:
            conn.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            first = conn.recv(100)
            conn.settimeout(0.3)  # the next byte is a second away: a per-recv timeout under that fires
            with pytest.raises(socket.timeout):
                conn.recv(100)
        assert first == b"H"
