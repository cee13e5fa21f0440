"""What ``tribunal serve`` answers, as pydantic models: the OpenAPI docs (``/docs``) show
them, and one name per wire field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from common.schemas import DeadLetter, Decision, Reject
from tribunal.ops.lookup import ItemStatus, Stage

Outcome = Literal["stored", "known", "accepted", "invalid"]


class RecordResult(BaseModel):
    """What became of one record of the body."""

    index: int = Field(description="Position of the record in the body, from 0.")
    id: str | None = Field(
        description="The item id: the record's, or the one given to it (None: an invalid "
        "record naming none)."
    )
    status: Outcome = Field(
        description="stored: added now. known: the fleet already has this id (waiting, "
        "being labeled, or labeled within decided_ttl_s): not added again. accepted: in a "
        "batch that mixed new and known ids, one or the other (`stored` and `known` count "
        "them). invalid: refused."
    )
    reason: str | None = Field(default=None, description="Why an invalid record was refused.")
    replicated: bool = Field(
        default=True,
        description="False: stored, but not confirmed by wait_replicas replicas in time "
        "(send it again to be sure: a known id is not added twice).",
    )


class IngestReply(BaseModel):
    """The answer to a POST, sent once the records are stored (and WAITed for)."""

    stored: int = Field(description="Records added now.")
    known: int = Field(description="Records whose id the fleet already had.")
    invalid: int = Field(description="Records refused; each says why in `records`.")
    unreplicated: int = Field(description="Stored, but not confirmed by wait_replicas replicas.")
    records: list[RecordResult] = Field(description="One per record, in the body's order.")


class Problem(BaseModel):
    """A request refused as a whole (4xx, 5xx): what is wrong, in one line."""

    error: str


class LabelReply(BaseModel):
    """Where one item stands. queued: waiting for the workers; voting: being voted on;
    judging: with the judge; labeled, rejected, dead: ended, with the final record; ended:
    ended, but its record is no longer kept in the final streams (retention_s)."""

    id: str
    stage: Stage
    label: str | None = Field(default=None, description="The final label, once labeled.")
    decision: Decision | None = None
    reject: Reject | None = None
    dead: DeadLetter | None = None

    @classmethod
    def of(cls, status: ItemStatus) -> LabelReply:
        label = status.decision.label if status.decision else None
        return cls(
            id=status.id,
            stage=status.stage,
            label=label,
            decision=status.decision,
            reject=status.reject,
            dead=status.dead,
        )


class Health(BaseModel):
    """``ok`` while Redis answers; else 503 with ``redis unreachable``."""

    status: Literal["ok", "redis unreachable"]
