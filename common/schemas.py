"""The records that travel through the streams: Item in, Vote per worker, Decision or Reject out.

Every record is a pydantic model serialised with orjson (never pickle), so any
language can read the streams and a malformed record fails loudly with a reason.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from common.injection import Finding

# Ids become part of Redis key names: keep them short and free of braces, spaces
# and glob characters so an id can never change a key's hash slot or pattern.
ITEM_ID_PATTERN = r"^[A-Za-z0-9._:@/-]{1,128}$"
ItemId = Annotated[str, StringConstraints(pattern=ITEM_ID_PATTERN)]

# A record as it arrives (a JSONL line, a CSV row, a payload read from a stream) before
# validation makes it an ``Item``: a JSON object with any fields and values. The one untyped
# shape in public signatures, and only at the input's edge (producers, common.validation).
RawRecord = dict[str, Any]


def is_item_id(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(ITEM_ID_PATTERN, value) is not None


def now() -> float:
    """Wall-clock seconds; every timestamp in the records uses it."""
    return time.time()


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields added after a release, left out of the JSON while unset: a consumer of the
    # release before (extra="forbid") still reads the records it can (a rolling upgrade).
    ADDED_LATER: ClassVar[frozenset[str]] = frozenset()

    def dump(self) -> bytes:
        unset = {name for name in self.ADDED_LATER if getattr(self, name) is None}
        return orjson.dumps(self.model_dump(exclude=unset or None))


class Item(Record):
    """One thing to label. ``text_b`` is the second text of pair tasks (similar_ticket)."""

    # JSON has no NaN or Infinity: read from a stream's bytes (model_validate_json), a float
    # field must refuse them as orjson does (metadata: common.validation.check_rules).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: ItemId
    task: str
    text: str
    text_b: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    gold: str | None = None  # known label, for evaluation and the demo; never shown to models
    produced_at: float | None = None


class Vote(Record):
    """One worker's answer for one item. ``label=None`` is an abstention (never counted)."""

    worker: str
    label: str | None = None
    confidence: float | None = None
    latency_ms: float = 0.0
    error: str | None = None
    raw: str | None = None  # what the model said, kept when it could not be parsed
    refused: bool = False  # the model's server refused the item: asking again gets the same
    truncated_chars: int = 0  # cut from the item's texts to fit the model's context


class Prediction(Record):
    """What a backend returns for one item; the worker turns it into a Vote."""

    label: str | None = None
    confidence: float | None = None
    error: str | None = None
    raw: str | None = None
    refused: bool = False  # as Vote's
    truncated_chars: int = 0  # as Vote's
    # Where the server says (never on the wire): the request's prompt tokens, and how many
    # of them its prompt cache held (consumers.backends.openai_wire.prompt_usage).
    prompt_tokens: int | None = None
    cached_tokens: int | None = None


class Decision(Record):
    """The final label of an item, with the votes behind it kept for audit, and what it
    cost: ``model_calls`` (the votes and the judge's verdict that reached a model) and
    ``model_seconds`` (their share of their batches' wall time, summed; each vote's own
    figure is its ``latency_ms``)."""

    id: str
    task: str
    label: str
    source: Literal["workers", "judge"]
    reason: str
    votes: list[Vote]
    judge: Vote | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    gold: str | None = None
    produced_at: float | None = None
    decided_at: float
    model_calls: int = 0
    model_seconds: float = 0.0
    flagged: list[Finding] = Field(default_factory=list)  # what the injection detector found

    @classmethod
    def of(
        cls,
        item: Item,
        label: str,
        source: Literal["workers", "judge"],
        reason: str,
        votes: list[Vote],
        judge: Vote | None = None,
        flagged: list[Finding] | None = None,
    ) -> Decision:
        """The decision for ``item``, carrying its metadata, gold label and timing through;
        ``flagged``: the task's ``TaskSpec.findings`` on it."""
        asked = [v for v in [*votes, judge] if v is not None and v.latency_ms > 0]
        return cls(
            id=item.id,
            task=item.task,
            label=label,
            source=source,
            reason=reason,
            votes=votes,
            judge=judge,
            metadata=item.metadata,
            gold=item.gold,
            produced_at=item.produced_at,
            decided_at=now(),
            model_calls=len(asked),
            model_seconds=round(sum(v.latency_ms for v in asked) / 1000, 6),
            flagged=flagged or [],
        )


class Reject(Record):
    """An entry that could not be labeled because its input is bad; ``reason`` says why."""

    id: str
    reason: str
    stream: str
    entry_id: str
    raw: str  # the start of the offending payload, for the operator
    rejected_at: float


class DeadLetter(Record):
    """An entry given up on after too many failed deliveries, with the last error."""

    id: str
    error: str
    stream: str
    group: str
    entry_id: str
    deliveries: int
    fields: dict[str, str]
    item: Item | None = None  # the item itself, when known: what `tribunal dlq replay` re-injects
    dead_at: float


class Escalation(Record):
    """An item the workers could not settle, on its way to the judge with their votes.

    With ``accepted`` set it is an audit instead: the workers settled the item on that
    label, which stands; the judge's answer is only recorded (an ``Audit``).
    ``sampling_rate``: the share of items like it that reached the judge this way — an
    audit's ``audit_fraction``; for an item an untrusted task sent past its first tier, the
    ``explore_fraction`` — so its lesson can stand for the items it was sampled from.
    """

    item: Item
    votes: list[Vote]
    reason: str
    escalated_at: float
    accepted: str | None = None
    sampling_rate: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)

    ADDED_LATER = frozenset({"sampling_rate"})


class Review(Record):
    """A flagged item whose flagged passages would have changed its label, for a person
    (``injection = "review"``): ``label`` is its final label (the judge's, reading it without
    them), ``with_passages`` the judge's answer reading it whole."""

    id: str
    task: str
    label: str
    with_passages: str
    flagged: list[Finding]
    item: Item
    reviewed_at: float


class Audit(Record):
    """The judge's answer on an item the workers settled: a live, unbiased sample of how
    often accepted labels disagree with the judge."""

    id: str
    task: str
    accepted: str
    judge: Vote
    agree: bool
    votes: list[Vote]
    gold: str | None = None
    audited_at: float
