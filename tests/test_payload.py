"""The body the worker sends, built in Python from the stored payload text and the row's insert_id: the token
and $insert_id filled in only where the event lacks them, the stored text sent verbatim when nothing is added,
and rows that are not events refused with the reason the dead letter records. Pure: no database."""

from __future__ import annotations

import json

import pytest

from outbox.validation import prepare
from worker.engine.payload import MalformedPayload, NoToken, event_body

EVENT = {"event": "Purchase", "properties": {"distinct_id": "u1", "price": 500, "note": "é €"}}


def test_an_event_with_its_own_token_is_sent_as_stored_byte_for_byte():
    insert_id, _, stored = prepare({**EVENT, "properties": {**EVENT["properties"], "token": "own"}})
    assert event_body(stored, insert_id, "worker-token") == stored.encode()


def test_the_workers_token_is_added_when_the_event_has_none():
    insert_id, _, stored = prepare(EVENT)
    body = event_body(stored, insert_id, "worker-token")
    sent = json.loads(body)
    assert sent["properties"]["token"] == "worker-token"
    assert {k: v for k, v in sent["properties"].items() if k != "token"} == json.loads(stored)["properties"]
    assert body == stored.encode()[:-2] + b',"token":"worker-token"}}'  # compact, non-ASCII as itself


@pytest.mark.parametrize("token", [None, 7, ""], ids=["null", "number", "empty"])
def test_a_token_that_is_not_a_usable_string_is_replaced(token):
    stored = json.dumps({"event": "E", "properties": {"distinct_id": "u", "token": token, "$insert_id": "i"}})
    assert json.loads(event_body(stored, "i", "worker-token"))["properties"]["token"] == "worker-token"


def test_no_token_anywhere_is_refused_with_the_fix():
    insert_id, _, stored = prepare(EVENT)
    with pytest.raises(NoToken, match="^no token: .*FP_OUTBOX_TOKEN"):
        event_body(stored, insert_id, None)


def test_a_hand_written_row_without_insert_id_gets_the_columns():
    stored = '{"event": "E", "properties": {"distinct_id": "u", "token": "t"}}'
    assert json.loads(event_body(stored, "col-id", None))["properties"]["$insert_id"] == "col-id"


def test_the_payloads_own_insert_id_wins_over_the_column():
    stored = '{"event": "E", "properties": {"distinct_id": "u", "token": "t", "$insert_id": "own"}}'
    assert event_body(stored, "col-id", None) == stored.encode()


@pytest.mark.parametrize("stored", [
    '"just a string"', "[1, 2]", "null",
    '{"properties": {"distinct_id": "u"}}',            # no event
    '{"event": 5, "properties": {}}',                   # event not a string
    '{"event": "x", "properties": [1, 2]}',             # properties not an object
    '{"event": "x", "properties": {"n": 1e400}}',       # a number no JSON consumer can hold
    '{"event": "x", "properties": {"s": "\\ud800"}}',   # a lone surrogate
    "[" * 5000 + "]" * 5000,                            # absurdly deep
    "{not json",
], ids=["string", "list", "null", "no-event", "event-number", "properties-list", "huge-number", "surrogate", "deep",
        "not-json"])
def test_a_row_that_is_not_an_event_is_refused_as_malformed(stored):
    with pytest.raises(MalformedPayload, match="^malformed payload: "):
        event_body(stored, "i", "worker-token")
