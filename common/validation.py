"""Turn untrusted input into an Item, or say exactly what is wrong with it.

Producers call this per record before XADD; consumers call it again per entry,
because anything can write to a stream. Every failure is an ``InvalidItem``
whose message is the reason stored with the reject.
"""

from __future__ import annotations

import math

import orjson
from pydantic import ValidationError

from common.errors import InputError
from common.keys import RECORD_FIELD
from common.schemas import Item, RawRecord
from common.settings import InputRules


class InvalidItem(InputError, ValueError):
    """The input can never be labeled; the message says why."""


def parse_payload(payload: bytes | str) -> RawRecord:
    raw = payload.encode() if isinstance(payload, str) else payload
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidItem(f"payload is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidItem(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidItem(f"expected a JSON object, got {type(data).__name__}")
    return data


def validate_item(data: RawRecord, rules: InputRules) -> Item:
    """Check one record against the schema, the task registry and the size limits."""
    try:
        item = Item.model_validate(data)
    except ValidationError as exc:
        raise InvalidItem(_explain(exc)) from None
    return check_rules(item, rules)


def check_rules(item: Item, rules: InputRules) -> Item:
    """What the schema cannot say: a known task, its texts and the size limits."""
    tasks = rules.tasks
    task = tasks.get(item.task)
    if task is None:
        raise InvalidItem(f"unknown task {item.task!r} (known: {', '.join(sorted(tasks))})")
    for field, text in (("text", item.text), ("text_b", item.text_b)):
        if text is None:
            continue
        if not text.strip():
            raise InvalidItem(f"{field} is empty")
        if len(text) > rules.max_text_chars:
            raise InvalidItem(
                f"{field} has {len(text)} characters, over the limit of {rules.max_text_chars}"
            )
    if task.pair and item.text_b is None:
        raise InvalidItem(f"task {item.task!r} compares two tickets and needs text_b")
    if not task.pair and item.text_b is not None:
        raise InvalidItem(f"task {item.task!r} takes one text; text_b is not allowed")
    if not _finite(item.metadata):  # orjson would write them as null: the record would change
        raise InvalidItem("metadata holds NaN or an infinite number, which JSON cannot carry")
    try:
        size = len(orjson.dumps(item.metadata))
    except orjson.JSONEncodeError as exc:
        raise InvalidItem(f"metadata cannot be encoded as JSON: {exc}") from None
    if size > rules.max_metadata_bytes:
        raise InvalidItem(f"metadata is {size} bytes, over the limit of {rules.max_metadata_bytes}")
    if item.gold is not None and item.gold not in task.labels:
        raise InvalidItem(f"gold label {item.gold!r} is not one of {task.labels}")
    return item


def item_from_entry(fields: dict[bytes, bytes], rules: InputRules) -> Item:
    payload = fields.get(RECORD_FIELD)
    if payload is None:
        names = ", ".join(sorted(k.decode(errors="replace") for k in fields)) or "none"
        field = RECORD_FIELD.decode()
        raise InvalidItem(f"entry has no '{field}' field with the item JSON (fields: {names})")
    try:  # the common case in one pass over the bytes (pydantic parses the JSON itself)
        item = Item.model_validate_json(payload)
    except ValidationError:  # the slow path says what is wrong in the producer's words
        return validate_item(parse_payload(payload), rules)
    return check_rules(item, rules)


def _finite(value: object) -> bool:
    """No NaN or infinity anywhere in a JSON-like value (pydantic's JSON parser accepts NaN,
    Infinity and 1e400 under ``Any``, where orjson refuses them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def problems(exc: ValidationError, whole: str = "") -> str:
    """pydantic's errors in one line, ``where: what; …`` (``workers.a.backend: Field
    required; quorom: Extra inputs are not permitted``), without its documentation links;
    ``whole`` names the place of an error about the whole object (no field)."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or whole
        what = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: {what}" if where else what)
    return "; ".join(lines)


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "item"
        if err["type"] == "missing":
            parts.append(f"missing field '{where}'")
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{where}'")
        elif err["type"] == "string_pattern_mismatch" and where == "id":
            parts.append("field 'id' must be 1-128 characters of letters, digits and ._:@/-")
        else:
            parts.append(f"field '{where}': {err['msg']}")
    more = f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return "; ".join(parts) + more
