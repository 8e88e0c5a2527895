"""The /track receiver used by the tests, the demo and `fp-outbox sink`: real HTTP on 127.0.0.1."""

from __future__ import annotations

import time

import pytest
import requests

from worker.sink import Sink


def _event(i: int = 0, **props) -> dict:
    return {"event": "E", "properties": {"distinct_id": "u", "token": "secret", "time": 1.7e9,
                                         "$insert_id": f"id-{i}", **props}}


@pytest.fixture
def receiver():
    with Sink(burst_limit=None) as sink:
        yield sink


def test_records_and_answers_200_over_keep_alive(receiver):
    with requests.Session() as session:
        answers = [session.post(receiver.url, json=_event(i), timeout=5).status_code for i in range(50)]
    assert answers == [200] * 50
    received = receiver.received()
    assert [r.insert_id for r in received] == [f"id-{i}" for i in range(50)]
    assert received[0].token == "secret" and received[0].event == "E" and received[0].body["properties"]["time"] == 1.7e9
    assert receiver.counts() == {"requests": 50, "accepted": 50, "distinct_insert_ids": 50, "duplicates": 0,
                                 "rejected": 0}


@pytest.mark.parametrize("body, named", [
    (b"not json", "not JSON"),
    (b'{"properties": {}}', "'event'"),
    (b'{"event": "E", "properties": 3}', "'properties'"),
    (b'{"event": "E", "properties": {"token": "t", "time": 1}}', "distinct_id"),
    (b'{"event": "E", "properties": {"distinct_id": "u", "time": 1}}', "token"),
])
def test_malformed_events_get_400_naming_the_problem(receiver, body, named):
    answer = requests.post(receiver.url, data=body, timeout=5)
    assert answer.status_code == 400 and named in answer.json()["error"]


def test_scripted_answers_then_back_to_normal(receiver):
    receiver.answer_next(429, retry_after="7")
    receiver.answer_next(400, body="nope")
    first = requests.post(receiver.url, json=_event(1), timeout=5)
    second = requests.post(receiver.url, json=_event(2), timeout=5)
    third = requests.post(receiver.url, json=_event(3), timeout=5)
    assert (first.status_code, first.headers["Retry-After"]) == (429, "7")
    assert (second.status_code, second.text) == (400, "nope")
    assert third.status_code == 200
    assert [r.status for r in receiver.received()] == [429, 400, 200]


def test_reset_closes_the_connection_unanswered(receiver):
    receiver.answer_next(0)
    with pytest.raises(requests.ConnectionError):
        requests.post(receiver.url, json=_event(), timeout=5)
    assert receiver.received()[0].status == 0
    assert receiver.counts()["rejected"] == 1


def test_outage_answers_the_status_until_it_ends(receiver):
    receiver.outage(0.3, status=502)
    assert requests.post(receiver.url, json=_event(1), timeout=5).status_code == 502
    time.sleep(0.35)
    assert requests.post(receiver.url, json=_event(2), timeout=5).status_code == 200


def test_burst_limit_answers_429_with_retry_after():
    with Sink(burst_limit=5) as sink, requests.Session() as session:
        statuses = [session.post(sink.url, json=_event(i), timeout=5) for i in range(8)]
    assert [s.status_code for s in statuses] == [200] * 5 + [429] * 3
    assert statuses[-1].headers["Retry-After"] == "1"


def test_duplicates_are_counted_by_insert_id(receiver):
    for _ in range(3):
        requests.post(receiver.url, json=_event(1), timeout=5)
    requests.post(receiver.url, json=_event(2), timeout=5)
    assert receiver.counts()["duplicates"] == 2 and receiver.counts()["distinct_insert_ids"] == 2


def test_stats_and_events_pages_mask_the_token(receiver):
    requests.post(receiver.url, json=_event(1), timeout=5)
    base = receiver.url.rsplit("/", 1)[0]
    assert requests.get(f"{base}/_sink/stats", timeout=5).json()["accepted"] == 1
    [shown] = requests.get(f"{base}/_sink/events?limit=5", timeout=5).json()
    assert shown["insert_id"] == "id-1" and shown["token"] == "***"
    assert "secret" not in requests.get(f"{base}/_sink/events", timeout=5).text


def test_faults_change_while_running(receiver):
    receiver.set_faults(error_rate=1.0, error_status=503, retry_after="2")
    answer = requests.post(receiver.url, json=_event(), timeout=5)
    assert (answer.status_code, answer.headers.get("Retry-After")) == (503, "2")
    receiver.set_faults(error_rate=0.0)
    assert requests.post(receiver.url, json=_event(), timeout=5).status_code == 200
    with pytest.raises(TypeError, match="unknown fault"):
        receiver.set_faults(latencyy=1)
