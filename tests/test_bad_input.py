"""Every kind of bad input ends in the rejects stream, once, with a readable reason; the
consumers keep going. Entries are written to the stream by hand, bypassing the producer."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from test_consumers import WORKERS, Fleet, agree, produce

from common.settings import ModelSpec

pytestmark = pytest.mark.slow  # real processes, servers or clusters: `-m "not slow"` skips


def item(**fields: Any) -> dict[bytes, bytes]:
    record = {"id": "x", "task": "sentiment", "text": "My invoice is wrong.", **fields}
    return {b"d": orjson.dumps({k: v for k, v in record.items() if v is not ...})}


def raw(field: bytes) -> dict[bytes, bytes]:
    """A valid item's JSON with one more field written as raw bytes."""
    return {b"d": b'{"id":"x","task":"sentiment","text":"t",' + field + b"}"}


def nested(levels: int) -> dict[bytes, bytes]:
    metadata = b'{"k":' * levels + b"1" + b"}" * levels
    return {b"d": b'{"id":"x","task":"sentiment","text":"t","metadata":' + metadata + b"}"}


BAD: dict[str, tuple[dict[bytes, bytes], str]] = {
    "invalid JSON": ({b"d": b'{"id": "x", "text": "unterminated'}, "invalid JSON"),
    "JSON array": ({b"d": b'["sentiment", "hello"]'}, "expected a JSON object, got list"),
    "JSON string": ({b"d": b'"just a string"'}, "expected a JSON object, got str"),
    "JSON number": ({b"d": b"42"}, "expected a JSON object, got int"),
    "invalid UTF-8": ({b"d": b'{"id": "x", "text": "caf\xe9"}'}, "not valid UTF-8"),
    "empty payload": ({b"d": b""}, "invalid JSON"),
    "no d field": ({b"text": b"hello"}, "entry has no 'd' field"),
    "missing text": (item(text=...), "missing field 'text'"),
    "empty text": (item(text=""), "text is empty"),
    "whitespace text": (item(text=" \n\t "), "text is empty"),
    "text is a number": (item(text=12), "field 'text': Input should be a valid string"),
    "text is a list": (item(text=["a"]), "field 'text': Input should be a valid string"),
    "text too long": (item(text="a" * 8001), "text has 8001 characters, over the limit of 8000"),
    "text_b too long": (
        item(task="similar_ticket", text_b="b" * 9000),
        "text_b has 9000 characters",
    ),
    "unknown task": (item(task="horoscope"), "unknown task 'horoscope'"),
    "task is a number": (item(task=3), "field 'task': Input should be a valid string"),
    "missing task": (item(task=...), "missing field 'task'"),
    "pair task without text_b": (item(task="similar_ticket"), "needs text_b"),
    "text_b on a single-text task": (item(text_b="other"), "text_b is not allowed"),
    "metadata not an object": (item(metadata="vip"), "field 'metadata'"),
    "huge metadata": (
        item(metadata={"blob": "m" * 5000}),
        "metadata is 5011 bytes, over the limit of 4096",
    ),
    "too deeply nested": (nested(5000), "invalid JSON"),
    "id is a number": (item(id=7), "field 'id': Input should be a valid string"),
    "id with braces": (item(id="{0}x"), "field 'id' must be 1-128 characters"),
    "id too long": (item(id="i" * 200), "field 'id' must be 1-128 characters"),
    "unknown field": (item(priority="high"), "unknown field 'priority'"),
    "gold not in the label set": (item(gold="furious"), "gold label 'furious' is not one of"),
    "produced_at not a number": (item(produced_at="yesterday"), "field 'produced_at'"),
    # JSON has no NaN or infinity: pydantic's JSON parser takes them, orjson does not.
    "produced_at NaN": (raw(b'"produced_at":NaN'), "invalid JSON"),
    "NaN in metadata": (raw(b'"metadata":{"k":NaN}'), "NaN or an infinite number"),
    "overflowing number in metadata": (raw(b'"metadata":{"k":[1e400]}'), "infinite number"),
}


@pytest.fixture
def fleet(make_settings: Any) -> Fleet:
    workers = {name: ModelSpec(backend="simulated") for name in WORKERS}
    return Fleet(make_settings(workers=workers, block_ms=20))


def test_there_are_at_least_twenty_kinds() -> None:
    assert len(BAD) >= 20


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_entry_is_rejected_once_with_its_reason(fleet: Fleet, kind: str) -> None:
    fields, reason = BAD[kind]
    fleet.rt.redis.xadd(fleet.rt.keys.items, fields)  # type: ignore[arg-type]
    produce(fleet.rt.settings, agree("positive"))  # a good item behind it
    fleet.step()
    [reject] = fleet.final(fleet.rt.keys.rejects)
    assert reason in reject["reason"], reject
    assert [d["id"] for d in fleet.outputs()] == ["i0"], "the consumers stopped after bad input"


def test_a_resubmitted_id_is_labeled_once(fleet: Fleet) -> None:
    produce(fleet.rt.settings, agree("negative"))
    fleet.step()
    produce(fleet.rt.settings, agree("positive"))  # same id "i0", within the dedupe window
    fleet.step()
    assert [(d["id"], d["label"]) for d in fleet.outputs()] == [("i0", "negative")]
    assert fleet.rt.redis.keys(fleet.rt.keys.votes("*")) == []


@pytest.mark.parametrize(
    ("answer", "why"),
    [("", "no label"), ("I think it's fine?", "not one of"), ("POSITIVE!!", "not one of")],
)
def test_garbage_model_output_is_an_abstention_not_a_crash(
    fleet: Fleet, answer: str, why: str
) -> None:
    produce(fleet.rt.settings, {"alpha": answer, "beta": "neutral", "gamma": "neutral"})
    fleet.step()
    [decision] = fleet.outputs()
    alpha = next(v for v in decision["votes"] if v["worker"] == "alpha")
    assert alpha["label"] is None
    assert decision["label"] == "neutral"
