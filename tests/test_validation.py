"""Validation and normalisation of events (pure, no I/O): every rejection names its field, and the
conversions JSON cannot do by itself are done the same way every time."""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import json
import re
import time
import uuid
from pathlib import Path
from types import MappingProxyType

import pytest

import outbox
from outbox.validation import MAX_EVENT_BYTES, MAX_NESTING, TOKEN_ALLOWANCE, prepare

NOW = 1_700_000_000.0  # a fixed clock for the plausibility checks


def event(**properties) -> dict:
    """A valid event, with `properties` added to (or replacing) the required ones."""
    return {"event": "Purchase", "properties": {"distinct_id": "13793", **properties}}


def payload_of(evt, now: float | None = NOW) -> dict:
    return json.loads(prepare(evt, now=now)[2])


class Unserializable:
    pass


def self_referencing_properties() -> dict:
    evt = event()
    evt["properties"]["self"] = evt["properties"]
    return evt


def self_referencing_list() -> dict:
    items: list = [1]
    items.append(items)
    return event(items=items)


def nested(depth: int, leaf=1):
    """`depth` levels of lists around `leaf`."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# (case id, event, a fragment the message must contain)
INVALID = [
    # not a mapping
    ("none", None, "mapping"),
    ("list", [("event", "x")], "mapping"),
    ("string", '{"event": "Purchase"}', "mapping"),
    # `event`
    ("event missing", {"properties": {"distinct_id": "u"}}, "'event'"),
    ("event empty", {"event": "", "properties": {"distinct_id": "u"}}, "'event'"),
    ("event blank", {"event": "   ", "properties": {"distinct_id": "u"}}, "'event'"),
    ("event not a string", {"event": 42, "properties": {"distinct_id": "u"}}, "'event'"),
    ("event is None", {"event": None, "properties": {"distinct_id": "u"}}, "'event'"),
    # `properties`
    ("properties missing", {"event": "Purchase"}, "'properties'"),
    ("properties a list", {"event": "Purchase", "properties": [("distinct_id", "u")]}, "'properties'"),
    ("properties a string", {"event": "Purchase", "properties": "distinct_id=u"}, "'properties'"),
    ("properties None", {"event": "Purchase", "properties": None}, "'properties'"),
    # `distinct_id`
    ("distinct_id missing", {"event": "Purchase", "properties": {"price": 5}}, "distinct_id"),
    ("distinct_id empty", event(distinct_id=""), "distinct_id"),
    ("distinct_id blank", event(distinct_id="  "), "distinct_id"),
    ("distinct_id an int", event(distinct_id=13793), "distinct_id"),
    ("distinct_id None", event(distinct_id=None), "distinct_id"),
    # `time`: not a finite number
    ("time NaN", event(time=float("nan")), "time"),
    ("time inf", event(time=float("inf")), "time"),
    ("time -inf", event(time=float("-inf")), "time"),
    ("time Decimal NaN", event(time=decimal.Decimal("NaN")), "time"),
    ("time a string", event(time="1700000000"), "time"),
    ("time True", event(time=True), "time"),
    ("time False", event(time=False), "time"),
    ("time a datetime", event(time=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)), "time"),
    # `time`: not plausible epoch seconds
    ("time in milliseconds", event(time=1_700_000_000_000), "time"),
    ("time in microseconds", event(time=1_700_000_000_000_000), "time"),
    ("time zero", event(time=0), "time"),
    ("time negative", event(time=-1.5), "time"),
    ("time before 2000", event(time=915_148_800), "time"),
    ("time two days ahead", event(time=NOW + 2 * 86_400), "time"),
    ("time year 3000", event(time=32_503_680_000), "time"),
    # `$insert_id` present but not a non-empty string
    ("insert_id None", event(**{"$insert_id": None}), "$insert_id"),
    ("insert_id empty", event(**{"$insert_id": ""}), "$insert_id"),
    ("insert_id blank", event(**{"$insert_id": " "}), "$insert_id"),
    ("insert_id an int", event(**{"$insert_id": 12345}), "$insert_id"),
    ("insert_id a UUID", event(**{"$insert_id": uuid.UUID(int=1)}), "$insert_id"),
    # not JSON-serializable: the message names the path
    ("an object", event(cart=Unserializable()), "properties.cart"),
    ("a set", event(tags={"a", "b"}), "properties.tags"),
    ("a frozenset", event(tags=frozenset({"a"})), "properties.tags"),
    ("bytes", event(blob=b"\x00\x01"), "properties.blob"),
    ("deep in a list", event(items=[{"sku": "a"}, {"sku": "b", "meta": [1, object()]}]),
     "properties.items[1].meta[1]"),
    ("NaN float in properties", event(price=float("nan")), "properties.price"),
    ("inf float in a list", event(prices=[1.0, float("inf")]), "properties.prices[1]"),
    ("Decimal NaN in properties", event(price=decimal.Decimal("NaN")), "properties.price"),
    ("object at the top level", {"event": "Purchase", "properties": {"distinct_id": "u"}, "ctx": object()},
     "ctx"),
    # strings PostgreSQL cannot store: the message names the path
    ("NUL in a value", event(note="a\x00b"), "properties.note"),
    ("NUL in a nested value", event(items=[{"sku": "ok"}, {"sku": "\x00"}]), "properties.items[1].sku"),
    ("NUL in a key", event(**{"a\x00b": 1}), "properties['a\\x00b']"),
    ("NUL in the event name", {"event": "Pur\x00chase", "properties": {"distinct_id": "u"}}, "'event'"),
    ("NUL in distinct_id", event(distinct_id="u\x00"), "properties.distinct_id"),
    ("NUL in insert_id", event(**{"$insert_id": "i\x00"}), "properties.$insert_id"),
    ("lone high surrogate", event(note="a\ud800b"), "properties.note"),
    ("lone low surrogate in a list", event(tags=["ok", "\udc00"]), "properties.tags[1]"),
    ("surrogate in a key", event(meta={"\ud83d": 1}), "properties.meta['\\ud83d']"),
    ("surrogate pair as two code points", event(note="\ud83d\ude00"), "properties.note"),
    # structures JSON cannot hold
    ("self-referencing properties", self_referencing_properties(), "properties.self"),
    ("self-referencing list", self_referencing_list(), "properties.items[1]"),
    ("absurdly deep", event(deep=nested(100_000)), "properties.deep[0][0]"),
    ("one level too deep", event(deep=nested(MAX_NESTING - 1)), "properties.deep"),
    # over the size limit
    ("over MAX_EVENT_BYTES", event(blob="x" * MAX_EVENT_BYTES), str(MAX_EVENT_BYTES)),
]


@pytest.mark.parametrize("evt, fragment", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_events_are_refused_naming_the_field(evt, fragment):
    with pytest.raises(outbox.InvalidEvent) as caught:
        prepare(evt, now=NOW)
    assert fragment in str(caught.value)


@pytest.mark.parametrize("evt", [case[1] for case in INVALID], ids=[case[0] for case in INVALID])
def test_refusing_never_mutates_the_callers_event(evt):
    before = copy.deepcopy(evt) if not _holds_unclonable(evt) else None
    with pytest.raises(outbox.InvalidEvent):
        prepare(evt, now=NOW)
    if before is not None:
        assert _same(evt, before)


def _holds_unclonable(evt) -> bool:
    try:
        copy.deepcopy(evt)
    except Exception:
        return True
    return False


def _same(a, b) -> bool:
    # NaN != NaN, and fresh object() instances differ: compare their reprs' shapes instead.
    try:
        return json.dumps(a, default=lambda v: type(v).__name__, sort_keys=True) == json.dumps(
            b, default=lambda v: type(v).__name__, sort_keys=True
        )
    except ValueError:  # a cycle: repr shows it as {...} or [...]
        return repr(a) == repr(b)


def test_invalid_event_is_a_value_error():
    assert issubclass(outbox.InvalidEvent, ValueError)
    with pytest.raises(ValueError):
        prepare({"event": "", "properties": {"distinct_id": "u"}})


def test_huge_integer_time_is_refused_as_implausible():
    with pytest.raises(outbox.InvalidEvent, match="time"):
        prepare(event(time=10**400), now=NOW)


def test_signalling_nan_decimal_time_is_refused_naming_time():
    with pytest.raises(outbox.InvalidEvent, match="time"):
        prepare(event(time=decimal.Decimal("sNaN")), now=NOW)


def test_nested_read_only_mapping_is_stored_as_an_object():
    assert payload_of(event(meta=MappingProxyType({"a": 1})))["properties"]["meta"] == {"a": 1}


def _largest_accepted(filler: str, **properties) -> tuple[dict, int]:
    """An event whose `blob` of `filler` characters brings it exactly to the limit, and its size."""
    fixed = {"$insert_id": "i", "time": NOW, **properties}
    base = len(prepare(event(blob="", **fixed), now=NOW)[2].encode())
    limit = MAX_EVENT_BYTES if isinstance(properties.get("token"), str) else MAX_EVENT_BYTES - TOKEN_ALLOWANCE
    evt = event(blob=filler * ((limit - base) // len(filler.encode())), **fixed)
    return evt, limit


@pytest.mark.parametrize("filler", ["x", "é", "€", "😀"], ids=["ascii", "2-byte", "3-byte", "4-byte"])
@pytest.mark.parametrize("token", [None, "env-id"], ids=["no token", "own token"])
def test_the_limit_is_measured_in_utf8_bytes_of_the_stored_text(filler, token):
    evt, limit = _largest_accepted(filler, **({"token": token} if token else {}))
    stored = prepare(evt, now=NOW)[2]
    assert len(stored.encode()) > limit - len(filler.encode())  # filled to within one character
    assert len(stored.encode()) <= limit
    evt["properties"]["blob"] += filler * 2
    with pytest.raises(outbox.InvalidEvent, match=str(MAX_EVENT_BYTES)):
        prepare(evt, now=NOW)


def test_a_token_the_worker_adds_fits_in_the_allowance():
    # The worker inserts `"token":"<environment id>",` into events that carry none; environment ids
    # are UUIDs, so the event it sends stays within MAX_EVENT_BYTES.
    added = len(',"token":""'.encode()) + len(str(uuid.uuid4()))
    assert added <= TOKEN_ALLOWANCE


def test_the_stored_text_is_compact_utf8_json():
    stored = prepare(event(city="Zürich", price=1.5, tags=["a", "€"], **{"$insert_id": "i"}), now=NOW)[2]
    assert stored == json.dumps(json.loads(stored), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert "Zürich" in stored and "\\u" not in stored


def test_nesting_up_to_the_limit_is_accepted():
    # the event object and properties are two levels; the value may add the rest
    assert payload_of(event(deep=nested(MAX_NESTING - 2)))["properties"]["deep"] == nested(MAX_NESTING - 2)


def test_a_structure_shared_twice_is_not_a_cycle():
    shared = {"sku": "a"}
    assert payload_of(event(first=shared, second=[shared]))["properties"]["second"] == [{"sku": "a"}]


@pytest.mark.parametrize("text", ["\\u0000", "C:\\x00", "\\\\u0000"], ids=["escaped", "backslash x", "double"])
def test_text_that_only_looks_like_a_nul_is_kept(text):
    assert payload_of(event(note=text))["properties"]["note"] == text


CYCLE = "cannot be stored as JSON: it contains itself (a cycle); pass a copy without the cycle"


def test_a_cycle_through_a_read_only_mapping_is_refused():
    inner: dict = {}
    proxy = MappingProxyType(inner)
    inner["again"] = proxy
    with pytest.raises(outbox.InvalidEvent, match=re.escape(f"'properties.meta.again' {CYCLE}")):
        prepare(event(meta=proxy), now=NOW)


@pytest.mark.parametrize("evt, path", [(self_referencing_properties(), "properties.self"),
                                       (self_referencing_list(), "properties.items[1]")], ids=["mapping", "list"])
def test_a_cycle_is_refused_as_a_cycle_not_as_too_deep(evt, path):
    """The path alone would not tell: walking round a cycle also ends at the depth limit, at a path that
    starts the same."""
    with pytest.raises(outbox.InvalidEvent) as caught:
        prepare(evt, now=NOW)
    assert str(caught.value) == f"'{path}' {CYCLE}"


# ---------------------------------------------------------------- conversions

UTC = dt.timezone.utc

CONVERSIONS = [
    ("aware datetime", dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05+00:00"),
    ("naive datetime", dt.datetime(2024, 1, 2, 3, 4, 5, 600000), "2024-01-02T03:04:05.600000"),
    ("date", dt.date(2024, 1, 2), "2024-01-02"),
    ("Decimal with a fraction", decimal.Decimal("12.50"), 12.5),
    ("integral Decimal", decimal.Decimal("7"), 7),
    ("integral Decimal with zeros", decimal.Decimal("7.000"), 7),
    ("negative integral Decimal", decimal.Decimal("-3"), -3),
    ("UUID", uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
    ("tuple", (1, "a"), [1, "a"]),
]


@pytest.mark.parametrize("value, expected", [c[1:] for c in CONVERSIONS], ids=[c[0] for c in CONVERSIONS])
def test_conversions(value, expected):
    stored = payload_of(event(value=value))["properties"]["value"]
    assert stored == expected
    assert type(stored) is type(expected)


def test_conversions_inside_nested_structures():
    evt = event(order={"placed": dt.date(2024, 5, 6), "lines": [{"price": decimal.Decimal("9.99")}]})
    order = payload_of(evt)["properties"]["order"]
    assert order == {"placed": "2024-05-06", "lines": [{"price": 9.99}]}


def test_prepare_returns_insert_id_name_and_compact_json():
    insert_id, name, payload = prepare(event(price=500), now=NOW)
    assert name == "Purchase"
    decoded = json.loads(payload)
    assert decoded["event"] == "Purchase"
    assert decoded["properties"]["$insert_id"] == insert_id
    assert decoded["properties"]["price"] == 500
    assert decoded["properties"]["distinct_id"] == "13793"


def test_other_top_level_keys_are_kept():
    evt = {"event": "Purchase", "properties": {"distinct_id": "u"}, "context": {"ip": "1.2.3.4"}}
    assert payload_of(evt)["context"] == {"ip": "1.2.3.4"}


def test_a_read_only_mapping_is_accepted_as_the_event_and_properties():
    evt = MappingProxyType({"event": "Purchase", "properties": MappingProxyType({"distinct_id": "u"})})
    assert payload_of(evt)["properties"]["distinct_id"] == "u"


# ---------------------------------------------------------------- time

def test_time_is_filled_with_the_current_time_in_milliseconds():
    before = time.time()
    filled = payload_of(event(), now=None)["properties"]["time"]
    after = time.time()
    assert isinstance(filled, float)
    assert round(filled, 3) == filled
    assert before - 0.001 <= filled <= after + 0.001


def test_time_is_filled_from_the_given_clock():
    assert payload_of(event(), now=1_700_000_000.123456)["properties"]["time"] == 1_700_000_000.123


@pytest.mark.parametrize("given", [1_700_000_000, 1_700_000_000.5, 946_684_800, NOW + 3600],
                         ids=["int", "float", "2000-01-01", "an hour ahead"])
def test_given_time_is_kept(given):
    stored = payload_of(event(time=given))["properties"]["time"]
    assert stored == given
    assert type(stored) is type(given)


def test_decimal_time_is_kept_as_a_number():
    stored = payload_of(event(time=decimal.Decimal("1700000000.25")))["properties"]["time"]
    assert stored == 1_700_000_000.25


def test_time_plausibility_uses_the_real_clock_by_default():
    with pytest.raises(outbox.InvalidEvent, match="time"):
        prepare(event(time=time.time() + 2 * 86_400))
    prepare(event(time=time.time() - 60))


# ---------------------------------------------------------------- $insert_id

def test_insert_id_is_generated_as_a_uuid_when_absent():
    insert_id, _, payload = prepare(event(), now=NOW)
    assert str(uuid.UUID(insert_id)) == insert_id
    assert json.loads(payload)["properties"]["$insert_id"] == insert_id


def test_generated_insert_ids_differ():
    assert len({prepare(event(), now=NOW)[0] for _ in range(50)}) == 50


def test_given_insert_id_is_kept():
    insert_id, _, payload = prepare(event(**{"$insert_id": "order-13793-purchase"}), now=NOW)
    assert insert_id == "order-13793-purchase"
    assert json.loads(payload)["properties"]["$insert_id"] == "order-13793-purchase"


# ---------------------------------------------------------------- the caller's dict

def test_callers_event_is_not_mutated():
    props = {"distinct_id": "u", "cart": {"items": [1, 2]}, "when": dt.date(2024, 1, 2)}
    evt = {"event": "Purchase", "properties": props}
    snapshot = copy.deepcopy(evt)
    prepare(evt, now=NOW)
    assert evt == snapshot
    assert evt["properties"] is props
    assert "time" not in props and "$insert_id" not in props


def test_token_may_be_absent_or_present():
    assert "token" not in payload_of(event())["properties"]
    assert payload_of(event(token="env-id"))["properties"]["token"] == "env-id"


# ---------------------------------------------------------------- the documented table

# One example for each row of the validation table in docs/enqueue.md, by a phrase of the row's first cell.
DOCUMENTED_EXAMPLES = {
    "event not a mapping": ["Purchase"],
    "`event` missing": {"properties": {"distinct_id": "u"}},
    "`properties` missing": {"event": "Purchase"},
    "`distinct_id` missing": event(distinct_id=""),
    "`time` not a number": event(time="1700000000"),
    "`time` NaN or infinite": event(time=float("inf")),
    "`time` not plausible": event(time=1_700_000_000_000),
    "`$insert_id` present": event(**{"$insert_id": ""}),
    "a value JSON cannot hold": event(items=[{}, {}, {"sku": object()}]),
    "a string PostgreSQL cannot store": event(note="a\x00b"),
    "a structure that contains itself": self_referencing_properties(),
    "over the size limit": event(blob="x" * MAX_EVENT_BYTES),
}


def _documented_validation_rows() -> list[tuple[str, str]]:
    page = (Path(__file__).resolve().parent.parent / "docs" / "enqueue.md").read_text()
    section = page.split("\n## Validation\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (.+?) \| `(.+?)`.*\|$", section, re.MULTILINE)
    return [(cell, message) for cell, message in rows if cell != "---"]


def test_the_documented_validation_table_shows_the_real_messages():
    rows = _documented_validation_rows()
    assert len(rows) == len(DOCUMENTED_EXAMPLES)
    for cell, message in rows:
        [example] = [evt for phrase, evt in DOCUMENTED_EXAMPLES.items() if cell.startswith(phrase)]
        with pytest.raises(outbox.InvalidEvent) as caught:
            prepare(example, now=NOW)
        fragments = [re.escape(f.strip()).replace(r"\ N\ ", r"\ \d+\ ") for f in message.split("...") if f.strip()]
        assert re.search(".*".join(fragments), str(caught.value)), (cell, str(caught.value))


def test_public_names():
    assert outbox.MAX_EVENT_BYTES == MAX_EVENT_BYTES
    assert outbox.TOKEN_ALLOWANCE == TOKEN_ALLOWANCE and outbox.MAX_NESTING == MAX_NESTING
    assert set(outbox.__all__) >= {"InvalidEvent", "MAX_EVENT_BYTES", "enqueue", "enqueue_many", "identify"}
