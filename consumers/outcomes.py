"""The outcomes of an item, recorded in one place: a final label, a reject, a dead letter.

Handlers decide (``consumers.worker``, ``.aggregator``, ``.judge``); these functions queue
the outcome on the batch's ``Writes``, where the settle script makes it final exactly once
(whichever replica or re-delivery gets there first) in the same MULTI/EXEC as the XACK.
"""

from __future__ import annotations

import orjson

from common import metrics
from common.keys import RECORD_FIELD
from common.schemas import DeadLetter, Decision, Item, Reject, is_item_id, now
from common.validation import InvalidItem
from consumers.engine.handler import Entry
from consumers.engine.writes import Writes

DECISIONS_BY = {
    source: metrics.field(metrics.DECISIONS, {"source": source}) for source in ("workers", "judge")
}


def model_call(
    writes: Writes, labels: dict[str, str], seconds: float, prompt_tokens: int, cached_tokens: int
) -> None:
    """Record one batch asked of a model (``consumers.backends.ModelCall``): its time, and its
    prompt tokens with how many the server's prompt cache held (``status`` shows the share:
    a model that stops reusing its prefix pays the whole prompt on every item)."""
    writes.observe(metrics.MODEL_CALL, seconds, labels)
    if prompt_tokens:
        worker = {"worker": labels["worker"]}
        writes.incr(metrics.PROMPT_TOKENS, worker, prompt_tokens)
        writes.incr(metrics.CACHED_TOKENS, worker, cached_tokens)


def reject(writes: Writes, stream: str, entry: Entry, error: InvalidItem) -> None:
    """Settle a bad entry as a reject, once, whichever consumer sees it first."""
    payload = entry.fields.get(RECORD_FIELD, b"")
    record = Reject(
        id=entry_item_id(entry),
        reason=str(error),
        stream=stream,
        entry_id=entry.id,
        raw=payload[:300].decode("utf-8", errors="replace"),
        rejected_at=now(),
    )
    writes.settle(record.id, writes.keys.rejects, record.dump(), metrics.REJECTS)


def publish(
    writes: Writes,
    decision: Decision,
    escalated: bool,
    audit: bytes | None = None,
    lesson: bytes | None = None,
) -> None:
    """Settle an item with its final label, once, and record how long it took; ``audit``
    (an escalation for the judge) or, for the judge's decision, ``lesson`` (consumers.lessons)
    is sent only if this call settles it."""
    counter = DECISIONS_BY[decision.source]
    if decision.flagged:  # counted with the decision, once, by the settle script
        counter += "\n" + metrics.field(metrics.FLAGGED, {"task": decision.task})
    if escalated:
        also = (writes.keys.lessons, lesson) if lesson else None
    else:
        also = (writes.keys.judge, audit) if audit else None
    writes.settle(decision.id, writes.keys.output, decision.dump(), counter, also, escalated)
    if decision.produced_at is not None:
        latency = max(decision.decided_at - decision.produced_at, 0.0)
        writes.observe(metrics.ITEM_LATENCY, latency, {"source": decision.source})


def dead_letter(
    writes: Writes,
    stream: str,
    group: str,
    entry: Entry,
    item_id: str,
    error: str,
    item: Item | None,
    escalated: bool = False,
) -> None:
    record = DeadLetter(
        id=item_id,
        item=item,
        error=error,
        stream=stream,
        group=group,
        entry_id=entry.id,
        deliveries=entry.deliveries,
        fields={
            k.decode(errors="replace"): v.decode(errors="replace") for k, v in entry.fields.items()
        },
        dead_at=now(),
    )
    counter = metrics.field(metrics.DEAD_LETTERS, {"group": group})
    writes.settle(item_id, writes.keys.dead, record.dump(), counter, escalated=escalated)


def entry_item_id(entry: Entry) -> str:
    """The item id an entry claims, or one derived from the entry id when it has none usable."""
    try:
        claimed = orjson.loads(entry.fields.get(RECORD_FIELD, b""))["id"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        claimed = None
    return claimed if is_item_id(claimed) else f"entry-{entry.id}"
